"""The paper's claims, checked on a sweep's results table: prints the Markdown of benchmarks/results/README.md.

Reads OUT/results.json of `lnshift sweep benchmarks/paper_protocol.yaml` (or of merge_results.py) and
prints: the ID held-out accuracy per dataset, regime and method; paired comparisons over (dataset,
regime, seed) on the ID test and on the mean of the cross-domain tests (wins / ties / losses, mean
difference, Wilcoxon p, lnshift.report.stats); the same by regime; and the oracle FSR, FSR estimate
and chosen lambda per dataset; with learning rates chosen on validation (issue 21) also the values
chosen and how often at a grid's edge, the oracle FSR split by whether the small-data run chose its
reference's learning rate, the FSR estimate's rank correlation with the oracle, how far validation
accuracy overstates test accuracy, and (--holdout) the same cells selected on the whole hold-out.
Nothing here selects anything: every number is a test-set summary.

    python benchmarks/protocol_claims.py benchmarks/results/paper_protocol/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from lnshift.report.stats import paired_compare
from lnshift.report.sweep_report import Cell, Sweep, ordered, read_cell

# (method, against): the paper's claims first, then the baselines against LN
COMPARISONS = [
    ("ln", "lp"),
    ("cyclic", "ln"),
    ("cyclic-kx", "ln"),
    ("lp-ln", "ln"),
    ("ln+auto", "ln"),
    ("ln+fsr", "ln"),
    ("cyclic+auto", "cyclic"),
    ("full", "ln"),
    ("lora", "ln"),
    ("bitfit", "ln"),
]
NAMES = {
    "lp": "LP",
    "full": "full",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "ln": "LN",
    "lp-ln": "LP-LN",
    "cyclic": "cyclic",
    "cyclic-kx": "cyclic-kx",
    "ln+auto": "LN+auto",
    "ln+fsr": "LN+fsr",
    "cyclic+auto": "cyclic+auto",
}
FULL_DATA = "f1"
ID_TEST = "holdout"  # the held-out images of the training domain


def finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def accuracy_table(sweep: Sweep, seeds: int) -> str:
    """Mean ID held-out accuracy (%) per dataset and regime (rows) and method (columns)."""
    lines = [
        "| dataset, regime | " + " | ".join(NAMES.get(m, m) for m in sweep.methods) + " |",
        "|---|" + "---:|" * len(sweep.methods),
    ]
    for dataset in sweep.datasets:
        for regime in sweep.regimes:
            cells = []
            for method in sweep.methods:
                scores = finite([sweep.views["ID"](c) for c in sweep.group(dataset, regime, method)])
                n = "" if len(scores) >= seeds else f" ({len(scores)})"
                cells.append(f"{100 * np.mean(scores):.1f}{n}" if scores else "-")
            lines.append(f"| {dataset} {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_comparisons(sweep: Sweep) -> list[tuple[str, str]]:
    """The COMPARISONS whose two methods both ran (a protocol run on a subset of the methods)."""
    return [(m, a) for m, a in COMPARISONS if m in sweep.methods and a in sweep.methods]


def comparison_table(sweep: Sweep) -> str:
    lines = [
        "| comparison | ID: wins / ties / losses | ID mean diff | ID p | OOD: wins / ties / losses | OOD mean diff |",
        "|---|---|---:|---:|---|---:|",
    ]
    for method, against in run_comparisons(sweep):
        row = [f"{NAMES[method]} vs {NAMES[against]}"]
        for view in ("ID", "OOD"):
            c = paired_compare(*sweep.pairs(method, against, view))
            row.append(f"{c.wins} / {c.ties} / {c.losses}")
            row.append(f"{100 * c.mean_diff:+.1f}" if c.n_pairs else "-")  # no pairs: e.g. no cross-domain test
            if view == "ID":
                row.append(f"{c.p_value:.2g}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def by_regime_table(sweep: Sweep) -> str:
    """Mean paired ID difference (points) of each comparison in each regime, over datasets and seeds."""
    lines = ["| comparison | " + " | ".join(sweep.regimes) + " |", "|---|" + "---:|" * len(sweep.regimes)]
    for method, against in run_comparisons(sweep):
        cells = []
        for regime in sweep.regimes:
            c = paired_compare(*sweep.pairs(method, against, "ID", lambda k, r=regime: k[1] == r))
            cells.append(f"{100 * c.mean_diff:+.1f}" if c.n_pairs else "-")
        lines.append(f"| {NAMES[method]} vs {NAMES[against]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fsr_lambda_table(cells: list[Cell], datasets: list[str]) -> str:
    """Per dataset: LN runs below 100 % data (oracle FSR, FSR estimate) and the lambdas chosen."""
    lines = [
        "| dataset | oracle FSR mean (< 1) | FSR_est mean | abs error | same side of 1 | "
        "lambda auto mean (> 1 / = 1 / < 1) | lambda fsr mean |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for dataset in [*datasets, "all"]:
        mine = [c for c in cells if dataset in ("all", c.dataset) and c.regime != FULL_DATA]
        ln = [c for c in mine if c.method == "ln"]
        oracle = finite([c.fsr_oracle for c in ln])
        both = [c for c in ln if c.fsr_oracle is not None and c.fsr_est is not None]
        est = finite([c.fsr_est for c in both])
        errors = [abs(c.fsr_est - c.fsr_oracle) for c in both]
        side = sum((c.fsr_est < 1) == (c.fsr_oracle < 1) for c in both)
        auto = finite([c.lam for c in cells if dataset in ("all", c.dataset) and c.method == "ln+auto"])
        by_fsr = finite([c.lam for c in mine if c.method == "ln+fsr"])
        counts = f"{sum(v > 1 for v in auto)} / {sum(v == 1 for v in auto)} / {sum(v < 1 for v in auto)}"
        lines.append(
            f"| {dataset} | {np.mean(oracle):.2f} ({sum(v < 1 for v in oracle)} of {len(oracle)}) | "
            f"{np.mean(est):.2f} | {np.mean(errors):.2f} | {side} of {len(both)} | "
            f"{np.mean(auto):.2f} ({counts}) | {np.mean(by_fsr):.2f} |"
        )
    return "\n".join(lines)


def fmt_lr(value: float) -> str:
    return f"{value:g}"


def selection_table(rows: list[dict]) -> str:
    """Per trained method: the grids searched, how often each value won, at an edge, candidates failed."""
    lines = [
        "| method | grid(s) | chosen: count per value | at an edge | failed candidates |",
        "|---|---|---|---:|---:|",
    ]
    for method in ordered(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get("lr") is not None]
        if not mine or "+" in method:
            continue
        grids = sorted({r["lr_grid"] for r in mine}, key=lambda g: float(g.split()[0]))
        counts = Counter(float(r["lr"]) for r in mine)
        chosen = ", ".join(f"{fmt_lr(v)}: {counts[v]}" for v in sorted(counts))
        edge = sum(bool(r["lr_at_edge"]) for r in mine)
        failed = sum(int(r.get("lr_failed") or 0) for r in mine)
        lines.append(
            f"| {NAMES.get(method, method)} | {'; '.join(grids)} | {chosen} | {edge} of {len(mine)} | {failed} |"
        )
    return "\n".join(lines)


def reference_lrs(rows: list[dict]) -> dict[tuple, float]:
    """(dataset, seed) -> the learning rate LN chose at 100 % data: the oracle FSR's reference run."""
    return {(r["dataset"], r["seed"]): r["lr"] for r in rows if r["method"] == "ln" and r["regime"] == FULL_DATA}


def fsr_by_lr(rows: list[dict]) -> str:
    """LN's oracle FSR below 100 % data, split by whether the run chose its 100 % reference's lr."""
    reference = reference_lrs(rows)
    groups: dict[str, list[float]] = {"same lr as its reference": [], "smaller lr": [], "larger lr": []}
    pairs = []
    for r in rows:
        if r["method"] != "ln" or r["regime"] == FULL_DATA or r.get("fsr_oracle") is None:
            continue
        ref = reference.get((r["dataset"], r["seed"]))
        if ref is None:
            continue
        key = "same lr as its reference" if r["lr"] == ref else "smaller lr" if r["lr"] < ref else "larger lr"
        groups[key].append(float(r["fsr_oracle"]))
    for r in rows:
        if r["method"] == "ln+fsr" and r.get("fsr_oracle") is not None and r.get("fsr_est") is not None:
            pairs.append((float(r["fsr_oracle"]), float(r["fsr_est"])))
    lines = ["| LN run below 100 % data | n | oracle FSR mean | min - max | below 1 |", "|---|---:|---:|---|---:|"]
    for key, values in groups.items():
        if values:
            lines.append(
                f"| {key} | {len(values)} | {np.mean(values):.2f} | {min(values):.2f} - {max(values):.2f} | "
                f"{sum(v < 1 for v in values)} |"
            )
    if len(pairs) > 2:
        rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        lines.append(f"\nFSR estimate vs oracle (LN+fsr runs): Spearman {rho:.2f} (p = {p:.2g}, n = {len(pairs)}).")
    return "\n".join(lines)


def optimism_table(rows: list[dict], regimes: list[str]) -> str:
    """Validation minus ID test accuracy of the chosen run (points): how much selection flatters itself."""
    lines = ["| method | " + " | ".join(regimes) + " |", "|---|" + "---:|" * len(regimes)]
    for method in ordered(r["method"] for r in rows):
        if "+" in method:
            continue
        cells = []
        for regime in regimes:
            gaps = finite([optimism(r) for r in rows if r["method"] == method and r["regime"] == regime])
            cells.append(f"{100 * np.mean(gaps):+.1f}" if gaps else "-")
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def optimism(row: dict) -> float | None:
    val, test = row.get("val.accuracy"), row.get(f"test.{ID_TEST}.accuracy")
    return None if val is None or test is None else float(val) - float(test)


def holdout_table(rows: list[dict], holdout: list[dict], regimes: list[str]) -> str:
    """The same cells selected on the whole 20 % hold-out instead of a validation set the size of the data."""
    match = {r["id"]: r for r in rows}
    lines = [
        "| method, regime | cells | ID test, hold-out minus match | same lr chosen | optimism: match "
        "| optimism: hold-out |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in ordered(h["method"] for h in holdout):
        for regime in regimes:
            both = [
                (match[h["id"]], h)
                for h in holdout
                if h["method"] == method and h["regime"] == regime and h["id"] in match
            ]
            if not both:
                continue
            diff = [float(h[f"test.{ID_TEST}.accuracy"]) - float(m[f"test.{ID_TEST}.accuracy"]) for m, h in both]
            same = sum(m["lr"] == h["lr"] for m, h in both)
            opt_m = finite([optimism(m) for m, _ in both])
            opt_h = finite([optimism(h) for _, h in both])
            lines.append(
                f"| {NAMES.get(method, method)} {regime} | {len(both)} | {100 * np.mean(diff):+.1f} | "
                f"{same} of {len(both)} | {100 * np.mean(opt_m):+.1f} | {100 * np.mean(opt_h):+.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results.json of a sweep")
    parser.add_argument("--holdout", type=Path, help="results.json of the same cells selected with val_size: holdout")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    cells = [read_cell(row) for row in data["rows"]]
    sweep = Sweep(cells)
    seeds = len(data["seeds"])
    print(f"{len(cells)} of {data['cells']} cells; {len(data['missing'])} missing\n")
    print(f"ID held-out accuracy (%), mean over seeds ((n) = seeds when fewer than {seeds}):\n")
    print(accuracy_table(sweep, seeds) + "\n")
    print("Paired over (dataset, regime, seed), in accuracy points; OOD = mean of the cross-domain tests:\n")
    print(comparison_table(sweep) + "\n")
    print("Mean paired ID difference by regime (points):\n")
    print(by_regime_table(sweep) + "\n")
    print("FSR and lambda per dataset (LN runs below 100 % data; lambda auto over every regime):\n")
    print(fsr_lambda_table(cells, sweep.datasets))
    rows = data["rows"]
    if any(r.get("lr_grid") for r in rows):
        print("\nLearning rates chosen on validation (trained methods, every cell):\n")
        print(selection_table(rows) + "\n")
        print("Oracle FSR and the learning rate chosen:\n")
        print(fsr_by_lr(rows) + "\n")
        print("Validation minus ID test accuracy of the chosen run (points), by regime:\n")
        print(optimism_table(rows, sweep.regimes))
    if args.holdout:
        holdout = json.loads(args.holdout.read_text())["rows"]
        print("\nSelection on the whole 20 % hold-out vs on a validation set the size of the training subset:\n")
        print(holdout_table(rows, holdout, sweep.regimes))


if __name__ == "__main__":
    main()
