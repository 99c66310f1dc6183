"""Data parallelism, checked end to end: one GPU vs two on the same fit, and a sweep on one GPU vs two.

(a) one fit on one GPU and (b) the same fit as `lnshift fit --devices 2` (torchrun, NCCL) with the same
global batch: the tuned LayerNorms (adapter.safetensors) and metrics.json must agree to bf16 rounding,
and the training throughput (images/s between the first and the last epoch, so start-up, data
loading and the first epoch's warm-up are left out) is compared; (c) a small sweep with
`--devices 1` and `--devices 2`, wall clock. The model is a randomly initialised ViT-B/16 (no
download), the data synthetic images whose class sets a faint colour pattern.

    python benchmarks/ddp_check.py --out ddp_check.json             # needs 2 GPUs; about 4 minutes
    python benchmarks/ddp_check.py --smoke --out ddp_smoke.json     # CPU, gloo, tiny model: about 2 minutes
    python benchmarks/ddp_check.py --parts sweep --out sweep.json     # only (c)

Prints a table and writes every number to --out. Exits 1 when (a) and (b) disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from lnshift import rundir as rd
from lnshift.config import environment

# (a) vs (b): bf16 autocast makes the two runs' gradients differ in the last bits; Adam turns that into
# small differences of the tuned values. The shifts (tuned - pretrained) must agree to RTOL_SHIFT in norm,
# and every metric to ATOL_METRIC.
RTOL_SHIFT = 0.05
ATOL_METRIC = 0.03

FULL = {
    "options": {"model": "vit_base_patch16_224", "pretrained": False},
    "classes": 8,
    "train_per_class": 1024,  # 8192 images: 32 steps of 256 per epoch
    "batch_size": 256,
    "epochs": 4,
    # 12 units of several seconds each (lp is forward-only): long enough that the spawned workers' start-up
    # (import torch, CUDA context) does not decide the sweep's speed-up (times: results/README.md)
    "sweep_steps": 400,
    "sweep_methods": ["lp", "ln", "lp-ln"],
    "sweep_seeds": [0, 1, 2, 3],
}
SMOKE = {
    "options": {"model": "lnshift/test-vit", "model_kwargs": {"img_size": 32, "patch_size": 8}, "device": "cpu"},
    "classes": 4,
    "train_per_class": 24,
    "batch_size": 16,
    "epochs": 3,
    "sweep_steps": 2,
    "sweep_methods": ["lp", "ln"],
    "sweep_seeds": [0, 1],
}


def make_images(root: Path, classes: int, per_class: int, seed: int) -> None:
    """An ImageFolder of 64 px PNGs: noise around a class colour, with a random brightness (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        angle = 2 * np.pi * c / classes
        tint = 25 * np.array([np.cos(angle), np.sin(angle), np.cos(2 * angle)])
        for i in range(per_class):
            pixels = 128 + rng.normal(0, 20) + tint + rng.normal(0, 60, (64, 64, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def flags(options: dict) -> list[str]:
    """Fit options as command-line flags (JSON is YAML, and true/false are what --pretrained takes)."""
    return [
        x
        for k, v in options.items()
        for x in (f"--{k.replace('_', '-')}", json.dumps(v) if not isinstance(v, str) else v)
    ]


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in `log`; returns its wall-clock seconds, stops the check if it fails."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return seconds


def throughput(run_dir: Path, batch_size: int) -> float:
    """Training images per second from the first to the last epoch event (validation is a few images)."""
    epochs = [e for e in map(json.loads, (run_dir / rd.EVENTS).read_text().splitlines()) if e["event"] == "epoch"]
    first, last = epochs[0], epochs[-1]
    return (last["step"] - first["step"]) * batch_size / (last["time"] - first["time"])


def compare(one: Path, two: Path) -> dict:
    """How far the 2-GPU run is from the 1-GPU run: tuned values, shift and every metric."""
    a, b, base = (load_file(run / name) for run, name in ((one, rd.ADAPTER), (two, rd.ADAPTER), (one, rd.BASE)))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    norm = [k for k in a if not k.startswith("head.")]
    shift = torch.cat([(a[k] - base[k]).flatten().float() for k in norm])
    gap = torch.cat([(a[k] - b[k]).flatten().float() for k in norm])
    ma, mb = (rd.RunDir(run).read_json(rd.METRICS) for run in (one, two))
    splits = {"val": (ma["val"], mb["val"]), **{f"test:{k}": (v, mb["test"][k]) for k, v in ma["test"].items()}}
    metric_gap = {
        f"{split}.{name}": abs(x[name] - y[name])
        for split, (x, y) in splits.items()
        for name in x
        if name != "n" and isinstance(x[name], float)
    }
    same_n = all(x["n"] == y["n"] for x, y in splits.values())
    rel_shift = (gap.norm() / shift.norm().clamp_min(1e-12)).item()
    return {
        "max_abs_diff": diff,
        "rel_shift_diff": rel_shift,
        "max_metric_diff": max(metric_gap.values()),
        "same_sample_counts": same_n,
        "metrics_1gpu": ma,
        "metrics_2gpu": mb,
        "ok": same_n and rel_shift <= RTOL_SHIFT and max(metric_gap.values()) <= ATOL_METRIC,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the numbers")
    ap.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny model and data: checks the script")
    ap.add_argument("--workdir", help="folder for data and runs (default: a temporary one, removed)")
    ap.add_argument("--parts", default="fit,sweep", help="which checks: fit ((a) vs (b)), sweep ((c)), or both")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"fit", "sweep"}:
        ap.error(f"--parts {args.parts!r}: give fit, sweep or fit,sweep")
    if not args.smoke and torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs (or --smoke on CPU)")
    spec = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        result = check(work, spec, args.smoke, parts)
    rd.write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    if "equivalence" in result and not result["equivalence"]["ok"]:
        sys.exit(1)


def check(work: Path, spec: dict, smoke: bool, parts: set[str]) -> dict:
    start = time.perf_counter()
    classes = spec["classes"]
    make_images(work / "data" / "train", classes, spec["train_per_class"], seed=0)
    make_images(work / "data" / "val", classes, 16, seed=1)
    make_images(work / "data" / "test", classes, 32, seed=2)
    workers = 0 if smoke else max(2, min(12, (os.cpu_count() or 4) // 2 - 2))  # per process
    lnshift = [sys.executable, "-m", "lnshift"]
    # no random augmentation, and the last epoch rather than the best on validation: a near tie there
    # could make the two runs keep different epochs
    fit = [*lnshift, "fit", *flags(spec["options"]), "--method", "ln", "--augment", "none", "--select", "last"]
    fit += ["--train", str(work / "data" / "train"), "--val", str(work / "data" / "val")]
    fit += ["--test", f"synthetic={work / 'data' / 'test'}", "--batch-size", str(spec["batch_size"])]
    fit += ["--epochs", str(spec["epochs"]), "--min-epoch-steps", "1", "--workers", str(workers)]
    fit += ["--progress", "false"]

    result = {
        "smoke": smoke,
        "environment": environment(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "parts": sorted(parts),
    }
    if "fit" in parts:
        result.update(fit_part(work, spec, fit))
    if "sweep" in parts:
        result.update(sweep_part(work, spec, lnshift, workers))
    result["seconds"] = time.perf_counter() - start
    return result


def fit_part(work: Path, spec: dict, fit: list[str]) -> dict:
    """(a) vs (b): the same fit on one GPU and on two."""
    seconds = {}
    runs = {n: work / f"fit-{n}gpu" for n in (1, 2)}
    for n, out in runs.items():
        seconds[n] = run([*fit, "--devices", str(n), "--out", str(out)], work / f"fit-{n}gpu.log")
    speed = {n: throughput(out, spec["batch_size"]) for n, out in runs.items()}
    return {
        "fit_command": fit,
        "global_batch": spec["batch_size"],
        "equivalence": compare(runs[1], runs[2]),
        "throughput_img_s": {"1": speed[1], "2": speed[2], "speedup": speed[2] / speed[1]},
        "fit_wall_s": {"1": seconds[1], "2": seconds[2]},
    }


def sweep_part(work: Path, spec: dict, lnshift: list[str], workers: int) -> dict:
    """(c): one small sweep with --devices 1 and --devices 2, wall clock and tables."""
    sweep = {
        "base": {
            **spec["options"],
            "steps": spec["sweep_steps"],
            "batch_size": spec["batch_size"] // 2,
            "min_epoch_steps": 1,
            "workers": workers // 2,
            "augment": "none",
        },
        "datasets": {"synthetic": {"train": str(work / "data" / "train"), "val": str(work / "data" / "val")}},
        "methods": spec["sweep_methods"],
        "regimes": [{"fraction": 0.5}],
        "seeds": spec["sweep_seeds"],
    }
    sweep_seconds = {}
    for n in (1, 2):
        path = work / f"sweep-{n}gpu.yaml"
        path.write_text(yaml.safe_dump({"out": str(work / f"sweep-{n}gpu"), **sweep}))
        sweep_seconds[n] = run([*lnshift, "sweep", str(path), "--devices", str(n)], work / f"sweep-{n}gpu.log")
    results = [json.loads((work / f"sweep-{n}gpu" / "results.json").read_text()) for n in (1, 2)]
    tables = [[{k: v for k, v in row.items() if k != "run"} for row in r["rows"]] for r in results]
    return {
        "sweep_steps": spec["sweep_steps"],
        "sweep_wall_s": {"1": sweep_seconds[1], "2": sweep_seconds[2], "speedup": sweep_seconds[1] / sweep_seconds[2]},
        "sweep_units": len(spec["sweep_methods"]) * len(spec["sweep_seeds"]),
        "sweep_cells": results[0]["done"],
        "sweep_tables_equal": tables[0] == tables[1],
    }


def table(r: dict) -> str:
    rows = [("", "1 device", "2 devices", "2 vs 1")]
    if "equivalence" in r:
        tp, fw = r["throughput_img_s"], r["fit_wall_s"]
        rows.append(("training img/s", f"{tp['1']:.1f}", f"{tp['2']:.1f}", f"x{tp['speedup']:.2f}"))
        rows.append(("fit wall clock s", f"{fw['1']:.1f}", f"{fw['2']:.1f}", ""))
    if "sweep_wall_s" in r:
        sw = r["sweep_wall_s"]
        rows.append(("sweep wall clock s", f"{sw['1']:.1f}", f"{sw['2']:.1f}", f"x{sw['speedup']:.2f}"))
    lines = [f"{a:<20}{b:>12}{c:>12}{d:>10}" for a, b, c, d in rows]
    if "equivalence" in r:
        eq = r["equivalence"]
        lines.append(
            f"1 vs 2 devices: max |adapter diff| {eq['max_abs_diff']:.2e}, shift differs by "
            f"{eq['rel_shift_diff']:.2%} (<= {RTOL_SHIFT:.0%}), max metric diff {eq['max_metric_diff']:.4f} "
            f"(<= {ATOL_METRIC}), sample counts {'equal' if eq['same_sample_counts'] else 'DIFFER'}: "
            f"{'OK' if eq['ok'] else 'FAILED'}"
        )
    if "sweep_wall_s" in r:
        lines.append(f"sweep tables equal: {r['sweep_tables_equal']}")
    lines.append(f"total {r['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
