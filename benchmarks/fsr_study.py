"""The method on real data: LayerNorm shift, oracle vs estimated FSR, lambda (auto vs fsr), cyclic, baselines.

For each PACS domain the domain's images are split into a held-out test set (20 %), a validation
hold-out and a training pool. At each training fraction, every run gets the same number of optimiser
steps (`--steps`), so shifts are comparable; the 100 % run is the oracle reference T*. Lambda is
chosen on validation only; test accuracy is reported, never used.

    python benchmarks/fsr_study.py --out runs/fsr-study --model lnshift/vit-tiny-cifar10

Prints one table and writes results.json / results.csv beside the run directories.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from lnshift import rundir as rd
from lnshift.analyses.saved_run import estimate_fsr_of_run, fsr_of_run, rescale_run
from lnshift.config import FitConfig, environment
from lnshift.pipeline import fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pacs.zip"


def run(cfg: FitConfig) -> Path:
    """Fit once; a finished run directory is reused, so the study restarts where it stopped."""
    if rd.RunDir(cfg.runtime.out).done:
        return Path(cfg.runtime.out)
    start = time.time()
    fit(cfg, echo=None)
    print(f"  {cfg.runtime.out}: {time.time() - start:.1f} s", flush=True)
    return Path(cfg.runtime.out)


def accuracy(metrics: dict) -> dict[str, float]:
    """Validation and held-out test accuracy of a metrics.json."""
    return {"val": metrics["val"]["accuracy"], "test": metrics["test"]["holdout"]["accuracy"]}


def read_metrics(run_dir: Path) -> dict:
    return rd.RunDir(run_dir).read_json(rd.METRICS)


def save(out: Path, args: argparse.Namespace, rows: list[dict], start: float) -> None:
    record = {"args": vars(args), "environment": environment(), "seconds": round(time.time() - start, 1), "rows": rows}
    rd.write_json(out / "results.json", record)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pacs", default=str(DATA))
    ap.add_argument("--model", default="lnshift/vit-tiny-cifar10")
    ap.add_argument("--model-kwargs", default="{}", help="YAML constructor arguments (e.g. for a tiny CPU check)")
    ap.add_argument("--domains", default="photo,art_painting,cartoon,sketch")
    ap.add_argument("--fractions", default="0.05,0.2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default="runs/fsr-study")
    args = ap.parse_args()

    import yaml

    out = Path(args.out)
    rows = []
    start = time.time()
    for domain in args.domains.split(","):
        common = dict(
            model=args.model,
            model_kwargs=yaml.safe_load(args.model_kwargs),
            train=f"{args.pacs}:pacs/{domain}",
            test={},
            test_fraction=0.2,
            val_fraction=0.2,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            workers=args.workers,
            progress=False,
            cycles=2,
        )
        ref = run(FitConfig.from_dict({**common, "method": "ln", "out": str(out / domain / "ln-full")}))
        for fraction in [float(f) for f in args.fractions.split(",")]:
            tag = f"f{fraction:g}"
            ln = run(
                FitConfig.from_dict(
                    {**common, "method": "ln", "fraction": fraction, "out": str(out / domain / f"ln-{tag}")}
                )
            )
            oracle = fsr_of_run(ln, ref)
            est = estimate_fsr_of_run(ln, echo=None)
            n_train = len(rd.RunDir(ln).read_json(rd.SPLITS)["splits"]["train"]["indices"])
            base = {
                "domain": domain,
                "fraction": fraction,
                "n_train": n_train,
                "fsr_oracle": oracle.fsr_gamma,
                "fsr_oracle_beta": oracle.fsr_beta,
                "fsr_est": est["fsr_est"],
                "fsr_est_std": est["fsr_std"],
            }
            rows.append({**base, "method": "ln", "lambda": 1.0, **accuracy(read_metrics(ln))})
            for lam in ("auto", "fsr"):
                r = rescale_run(ln, lam, out=out / domain / f"ln-{tag}-{lam}", device="auto")
                rows.append(
                    {
                        **base,
                        "method": f"ln+{lam}",
                        "lambda": r["lambda"],
                        **accuracy(r["metrics"]),
                    }
                )
            for method in ("lp", "lp-ln", "cyclic"):
                d = run(
                    FitConfig.from_dict(
                        {**common, "method": method, "fraction": fraction, "out": str(out / domain / f"{method}-{tag}")}
                    )
                )
                rows.append({**base, "method": method, "lambda": None, **accuracy(read_metrics(d))})
                if method == "cyclic":
                    r = rescale_run(d, "auto", out=out / domain / f"cyclic-{tag}-auto", device="auto")
                    rows.append(
                        {
                            **base,
                            "method": "cyclic+auto",
                            "lambda": r["lambda"],
                            **accuracy(r["metrics"]),
                        }
                    )
            print(f"{domain} {tag}: done at {time.time() - start:.0f} s", flush=True)
            save(out, args, rows, start)  # partial results survive an interrupted study

    print(
        f"{'domain':<13}{'frac':>6}{'n':>6} {'method':<12}{'lambda':>7}{'val':>7}{'test':>7}{'FSR_or':>8}{'FSR_est':>9}"
    )
    for r in rows:
        lam = "" if r["lambda"] is None else f"{r['lambda']:.2f}"
        print(
            f"{r['domain']:<13}{r['fraction']:>6g}{r['n_train']:>6} {r['method']:<12}{lam:>7}{r['val']:>7.3f}"
            f"{r['test']:>7.3f}{r['fsr_oracle']:>8.3f}{r['fsr_est']:>9.3f}"
        )
    print(json.dumps({"seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
