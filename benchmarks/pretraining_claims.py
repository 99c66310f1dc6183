"""Inside vs outside the pretraining distribution: the paper's claims about shift, FSR and lambda, per model.

The paper says out-of-distribution targets give a lower FSR and a larger lambda (> 1), and that targets
close to the pretraining data favour conservative updates (lambda < 1). Each bundled model's pretraining
data is known exactly, so which protocol datasets lie inside it is decided by construction (SIDES), not
measured. Reads the results.json of `lnshift sweep benchmarks/paper_protocol.yaml` runs, one or more per
model (the first file that has a cell wins), and prints per model and dataset: LN's and LP's ID held-out
accuracy, the LayerNorm shift learned at 100 % data where the table has it, LN's oracle FSR below 100 %
data (all runs, and only those that chose their reference's learning rate: the lr choice moves FSR more
than the data does), the lambda that `ln+auto` chose on validation, and what it gained; then the same
pooled by side. Nothing here selects anything: every number is a test-set summary.

    cd benchmarks/results && python ../pretraining_claims.py \\
    lnshift/vit-tiny-cifar10=paper_protocol_selected/results.json,paper_protocol_selected/parts/call6_results.json \\
    lnshift/vit-tiny-in200-sup=paper_protocol_in200/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from protocol_claims import FULL_DATA, ID_TEST, finite, reference_lrs

from lnshift.report.sweep_report import Sweep, read_cell

# dataset -> side, by construction: what each model was pretrained on (pretrain/README.md)
SIDES = {
    # CIFAR-10 train: 10 classes of small photos; PACS photo are photos of other classes (dog and horse shared)
    "lnshift/vit-tiny-cifar10": {"cifar10": "inside", "pacs-photo": "near"},
    # Tiny-ImageNet-200: photos of 200 ImageNet classes at 32 px; CIFAR-10's and PACS photo's classes are
    # ImageNet-like photos (many of them ImageNet classes or their near kin)
    "lnshift/vit-tiny-in200-sup": {"cifar10": "inside", "pacs-photo": "inside"},
}
OUTSIDE = "outside"  # every other dataset: PACS art, cartoon and sketch, LC25000, brain MRI
ORDER = ("inside", "near", OUTSIDE)


def side(model: str, dataset: str) -> str:
    return SIDES.get(model, {}).get(dataset, OUTSIDE)


def read_rows(paths: list[Path]) -> list[dict]:
    """Rows of several results.json files, by cell id, the first file that has a cell winning."""
    rows: dict[str, dict] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            rows.setdefault(row["id"], row)
    return list(rows.values())


def mean(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    values = finite(values)
    return f"{scale * np.mean(values):{fmt}}" if values else "-"


def paired(rows: list[dict], method: str, against: str, regime: str | None = None) -> list[float]:
    """ID test differences of `method` minus `against` over the (dataset, regime, seed) cells both have."""
    sweep = Sweep([read_cell(r) for r in rows])
    a, b = sweep.pairs(method, against, "ID", lambda key: regime in (None, key[1]))
    return [x - y for x, y in zip(a, b, strict=True)]


def fsr(rows: list[dict], same_lr: bool = False) -> list[float]:
    """LN's oracle FSR below 100 % data; with same_lr only runs that chose their reference's learning rate."""
    ref = reference_lrs(rows)
    return [
        r["fsr_oracle"]
        for r in rows
        if r["method"] == "ln" and r["regime"] != FULL_DATA and r.get("fsr_oracle") is not None
        if not same_lr or r["lr"] == ref.get((r["dataset"], r["seed"]))
    ]


def lambdas(rows: list[dict]) -> list[float]:
    return [r["lambda"] for r in rows if r["method"] == "ln+auto" and r.get("lambda") is not None]


def line(label: str, rows: list[dict]) -> str:
    key = f"test.{ID_TEST}.accuracy"
    acc = {m: [r.get(key) for r in rows if r["method"] == m and r["regime"] == FULL_DATA] for m in ("lp", "ln")}
    shift = [r.get("shift_ln") for r in rows if r["method"] == "ln" and r["regime"] == FULL_DATA]
    all_fsr, same = fsr(rows), fsr(rows, same_lr=True)
    lam = lambdas(rows)
    counts = f"{sum(v > 1 for v in lam)} / {sum(v == 1 for v in lam)} / {sum(v < 1 for v in lam)}"
    return (
        f"| {label} | {mean(acc['ln'], 100, '.1f')} | {mean(paired(rows, 'ln', 'lp', FULL_DATA), 100, '+.1f')} | "
        f"{mean(paired(rows, 'ln', 'lp', 'f0.02'), 100, '+.1f')} | {mean(shift)} | "
        f"{mean(all_fsr)} ({sum(v < 1 for v in all_fsr)} of {len(all_fsr)}) | "
        f"{mean(same)} ({sum(v < 1 for v in same)} of {len(same)}) | {mean(lam)} ({counts}) | "
        f"{mean(paired(rows, 'ln+auto', 'ln'), 100, '+.1f')} |"
    )


HEADER = (
    "| model / dataset (side) | LN ID acc 100 % | LN - LP 100 % | LN - LP 2 % | shift_ln 100 % | "
    "oracle FSR < 100 % (< 1) | same lr as reference (< 1) | lambda auto (> 1 / = 1 / < 1) | LN+auto - LN |\n"
    "|---|---:|---:|---:|---:|---|---|---|---:|"
)


def report(models: dict[str, list[dict]]) -> str:
    """Per model: a row per dataset, then a row per side pooling that side's datasets."""
    out = [HEADER]
    for model, rows in models.items():
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        datasets.sort(key=lambda d: ORDER.index(side(model, d)))
        for dataset in datasets:
            mine = [r for r in rows if r["dataset"] == dataset]
            out.append(line(f"{model} / {dataset} ({side(model, dataset)})", mine))
        for name in ORDER:
            mine = [r for r in rows if side(model, r["dataset"]) == name]
            if mine:
                out.append(line(f"**{model} / all {name}**", mine))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL=RESULTS[,RESULTS]", help="a model's results.json files")
    args = parser.parse_args()
    models = {}
    for spec in args.models:
        model, _, paths = spec.partition("=")
        models[model] = read_rows([Path(p) for p in paths.split(",")])
    print(report(models))


if __name__ == "__main__":
    main()
