"""The paper's claims, checked on a sweep's results table: prints the Markdown of benchmarks/results/README.md.

Reads OUT/results.json of `lnshift sweep benchmarks/paper_protocol.yaml` (or of merge_results.py) and
prints: the ID held-out accuracy per dataset, regime and method; paired comparisons over (dataset,
regime, seed) on the ID test and on the mean of the cross-domain tests (wins / ties / losses, mean
difference, Wilcoxon p, lnshift.report.stats); the same by regime; and the oracle FSR, FSR estimate
and chosen lambda per dataset. Nothing here selects anything: every number is a test-set summary.

    python benchmarks/protocol_claims.py benchmarks/results/paper_protocol/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lnshift.report.stats import paired_compare
from lnshift.report.sweep_report import Cell, Sweep, read_cell

# (method, against): the paper's claims first, then the baselines against LN
COMPARISONS = [
    ("ln", "lp"),
    ("cyclic", "ln"),
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


def comparison_table(sweep: Sweep) -> str:
    lines = [
        "| comparison | ID: wins / ties / losses | ID mean diff | ID p | OOD: wins / ties / losses | OOD mean diff |",
        "|---|---|---:|---:|---|---:|",
    ]
    for method, against in COMPARISONS:
        row = [f"{NAMES[method]} vs {NAMES[against]}"]
        for view in ("ID", "OOD"):
            c = paired_compare(*sweep.pairs(method, against, view))
            row.append(f"{c.wins} / {c.ties} / {c.losses}")
            row.append(f"{100 * c.mean_diff:+.1f}")
            if view == "ID":
                row.append(f"{c.p_value:.2g}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def by_regime_table(sweep: Sweep) -> str:
    """Mean paired ID difference (points) of each comparison in each regime, over datasets and seeds."""
    lines = ["| comparison | " + " | ".join(sweep.regimes) + " |", "|---|" + "---:|" * len(sweep.regimes)]
    for method, against in COMPARISONS:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results.json of a sweep")
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


if __name__ == "__main__":
    main()
