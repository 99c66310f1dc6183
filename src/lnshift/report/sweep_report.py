"""The sections of a sweep's report, from the `results.json` and `summary.json` that `lnshift sweep` writes.

Rows are read as docs/sweep.md defines them: `dataset, method, regime, fraction, shots, seed, lambda,
fsr_oracle, fsr_est` and metrics as `val.<metric>` / `test.<name>.<metric>`. A sweep's test set
`holdout` (held-out images of the training domain) is its in-distribution (ID) test; every other
test set is out of distribution (OOD), and a cell's OOD accuracy is the mean over them. Without a
holdout, each test set is shown by name. Comparisons pair cells on (dataset, regime, seed), so a pair
shares its data subset, split and seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunDirError
from ..training.phases import BUDGETS
from . import figures as F
from .html import Figures, Section, esc, key_values, note, num, table, warning
from .stats import bootstrap_ci, mean_std, paired_compare

METRIC = "accuracy"
REFERENCE = "ln"
BASELINES = ("lp", "full", "bitfit", "lora")  # the methods that train no LayerNorm-only parameters
ID_TEST = "holdout"
VAL = "val"


@dataclass
class Cell:
    dataset: str
    method: str
    regime: str
    fraction: float | None
    shots: int | None
    seed: Any
    tests: dict[str, float]  # test set -> accuracy
    val: float
    lam: float | None
    fsr_oracle: float | None
    fsr_est: float | None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_cell(row: dict) -> Cell:
    prefix, suffix = "test.", f".{METRIC}"
    tests = {
        k[len(prefix) : -len(suffix)]: float(v) for k, v in row.items() if k.startswith(prefix) and k.endswith(suffix)
    }
    return Cell(
        dataset=str(row["dataset"]),
        method=str(row["method"]),
        regime=str(row["regime"]),
        fraction=_float(row.get("fraction")),
        shots=row.get("shots"),
        seed=row.get("seed"),
        tests=tests,
        val=float(row.get(f"{VAL}.{METRIC}", math.nan)),
        lam=_float(row.get("lambda")),
        fsr_oracle=_float(row.get("fsr_oracle")),
        fsr_est=_float(row.get("fsr_est")),
    )


def ordered(values: Iterable) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def ood_mean(cell: Cell) -> float:
    others = [v for k, v in cell.tests.items() if k != ID_TEST]
    return float(np.mean(others)) if others else math.nan


class Sweep:
    """The cells, the orders in which they are shown, and the views (ID, OOD or test sets by name)."""

    def __init__(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.datasets = ordered(c.dataset for c in cells)
        self.methods = ordered(c.method for c in cells)
        self.regimes = ordered(
            c.regime for c in sorted(cells, key=lambda c: (c.shots is not None, c.fraction or 0, c.shots or 0))
        )
        names = ordered(k for c in cells for k in c.tests)
        self.views: dict[str, Callable[[Cell], float]] = {}
        if ID_TEST in names:
            self.views["ID"] = lambda c: c.tests.get(ID_TEST, math.nan)
            if len(names) > 1:
                self.views["OOD"] = ood_mean
        else:
            self.views = {name: (lambda c, name=name: c.tests.get(name, math.nan)) for name in names}

    def group(self, dataset: str, regime: str, method: str) -> list[Cell]:
        return [c for c in self.cells if (c.dataset, c.regime, c.method) == (dataset, regime, method)]

    def keyed(self, method: str, view: str) -> dict[tuple, float]:
        """(dataset, regime, seed) -> score, for pairing."""
        value = self.views[view]
        return {(c.dataset, c.regime, c.seed): value(c) for c in self.cells if c.method == method}

    def pairs(
        self, method: str, against: str, view: str, keep: Callable[[tuple], bool] = lambda key: True
    ) -> tuple[list[float], list[float]]:
        """Scores of `method` and `against` on the (dataset, regime, seed) keys both have finite, and `keep`."""
        a, b = self.keyed(method, view), self.keyed(against, view)
        keys = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k]) and keep(k)]
        return [a[k] for k in keys], [b[k] for k in keys]

    def best_baseline(self) -> str | None:
        """The baseline with the highest mean validation accuracy: chosen on validation, never on a test set."""
        means = {m: mean_std([c.val for c in self.cells if c.method == m])[0] for m in self.methods if m in BASELINES}
        means = {m: v for m, v in means.items() if math.isfinite(v)}
        return max(means, key=means.__getitem__) if means else None


def mean_cell(values: list[float]) -> str:
    """'mean ± std [95% CI]' over seeds, in percent."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    mean, std = mean_std(finite)
    low, high = bootstrap_ci(finite)
    spread = f" ± {100 * std:.1f}" if math.isfinite(std) else ""
    return f"{100 * mean:.1f}{spread} [{100 * low:.1f}, {100 * high:.1f}]"


def _mean(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return num(float(np.mean(finite))) if finite else "–"


def results_section(sweep: Sweep) -> Section:
    views = list(sweep.views)
    header = ["dataset", "regime", "method", "seeds", "val %", *(f"{v} %" for v in views), "λ", "FSR", "FSR_est"]
    rows = []
    for dataset in sweep.datasets:
        for regime in sweep.regimes:
            for method in sweep.methods:
                group = sweep.group(dataset, regime, method)
                if group:
                    rows.append(
                        [dataset, regime, method, str(len(group)), mean_cell([c.val for c in group])]
                        + [mean_cell([sweep.views[v](c) for c in group]) for v in views]
                        + [_mean([c.lam for c in group]), _mean([c.fsr_oracle for c in group])]
                        + [_mean([c.fsr_est for c in group])]
                    )
    text = (
        f"Accuracy: mean ± sample std over seeds, then the 95% percentile-bootstrap interval of the mean. "
        f"{'ID is the test set holdout; OOD the mean over the other test sets. ' if 'ID' in views else ''}"
        "λ (the rescaling applied), FSR (oracle, against the fraction 1.0 run) and FSR_est are means."
        + "".join(f" {m}: {text}." for m, text in BUDGETS.items() if m in {c.partition("+")[0] for c in sweep.methods})
    )
    return Section("results", "Results", note(text) + table(header, rows, cls="results", text_columns=3))


def comparison_row(sweep: Sweep, method: str, against: str, view: str) -> list[str] | None:
    a, b = sweep.pairs(method, against, view)
    if not a:
        return None
    r = paired_compare(a, b)
    return [
        view,
        method,
        against,
        str(r.n_pairs),
        f"{100 * r.mean_diff:+.2f}",
        f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]",
        f"{r.wins}/{r.ties}/{r.losses}",
        num(r.p_value, 3),
    ]


def comparisons_section(sweep: Sweep) -> Section:
    best = sweep.best_baseline()
    against = [m for m in ordered([REFERENCE, best]) if m in sweep.methods]
    rows = [
        row
        for view in sweep.views
        for ref in against
        for method in sweep.methods
        if method != ref and (row := comparison_row(sweep, method, ref, view)) is not None
    ]
    text = (
        f"Each method against plain {REFERENCE} and against the best baseline ({best or 'none in this sweep'}: "
        f"the highest mean validation accuracy among {', '.join(BASELINES)}), paired on (dataset, regime, seed). "
        "Differences in accuracy points; the interval is a paired bootstrap of the mean difference; p is the "
        "two-sided Wilcoxon signed-rank test (scipy; zero differences dropped), not adjusted for multiple "
        "comparisons. W/T/L: pairs won, tied, lost."
    )
    header = ["test", "method", "against", "pairs", "mean diff (pp)", "95% CI (pp)", "W/T/L", "Wilcoxon p"]
    body = note(text) + (table(header, rows, cls="comparisons", text_columns=3) if rows else note("No matched pairs."))
    return Section("comparisons", "Paired comparisons", body)


def series(sweep: Sweep, dataset: str, method: str, x: Callable[[Cell], float | None], value) -> F.Series | None:
    """A method's mean and 95% interval over seeds at each regime with an x, of `value(cell) -> float | None`."""
    points = []
    for regime in sweep.regimes:
        group = [c for c in sweep.group(dataset, regime, method) if x(c) is not None]
        vals = [v for c in group if (v := value(c)) is not None and math.isfinite(v)]
        if vals:
            points.append((x(group[0]), float(np.mean(vals)), *bootstrap_ci(vals)))
    if not points:
        return None
    xs, means, lows, highs = (list(col) for col in zip(*points, strict=True))
    return F.Series(method, xs, means, lows, highs)


def figures_section(sweep: Sweep, figs: Figures) -> Section:
    by_fraction = any(c.fraction is not None for c in sweep.cells)
    xlabel = "data fraction" if by_fraction else "shots per class"

    def x(cell: Cell) -> float | None:
        return cell.fraction if by_fraction else cell.shots

    def rows_of(quantities: list[tuple[str, str, Callable, list[str]]]) -> list[list]:
        rows = []
        for dataset in sweep.datasets:
            row = []
            for title, ylabel, value, methods in quantities:
                lines = [s for m in methods if (s := series(sweep, dataset, m, x, value)) is not None]
                if lines:
                    row.append((f"{dataset}: {title}", ylabel, lines))
            if row:
                rows.append(row)
        return rows

    trained = [m for m in sweep.methods if "+" not in m]  # a rescaled variant shares its run's FSR
    rescaled = [m for m in sweep.methods if "+" in m]
    accuracy = [(v, f"{METRIC} (%)", lambda c, f=f: 100 * f(c), sweep.methods) for v, f in sweep.views.items()]
    shift = [
        ("oracle FSR", "FSR", lambda c: c.fsr_oracle, trained),
        ("estimated FSR", "FSR_est", lambda c: c.fsr_est, trained),
        ("applied lambda", "lambda", lambda c: c.lam, rescaled),
    ]
    xs = [x(c) for c in sweep.cells if x(c) is not None]
    log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 10
    parts = []
    skipped = sorted({c.regime for c in sweep.cells if x(c) is None})
    if skipped:
        parts.append(note(f"Regimes {', '.join(skipped)} are not on the {xlabel} axis; they are in the tables."))
    if rows := rows_of(accuracy):
        caption = f"Test accuracy against the {xlabel} ({' vs '.join(sweep.views)}); mean and 95% CI over seeds."
        parts.append(figs.embed("sweep_accuracy", F.regime_panels(rows, sweep.methods, xlabel, log_x), caption))
    if rows := rows_of(shift):
        caption = f"Oracle and estimated FSR, and the lambda applied by rescaled methods, against the {xlabel}."
        parts.append(figs.embed("sweep_fsr_lambda", F.regime_panels(rows, sweep.methods, xlabel, log_x), caption))
    return Section("figures", f"Against the {xlabel}", "".join(parts))


def summary_section(sweep: Sweep, results: dict, summary: dict | None) -> Section:
    parts = []
    if results.get("missing"):
        missing = results["missing"]
        parts.append(
            warning(f"{len(missing)} cells have not finished: {', '.join(missing[:10])}{' …' * (len(missing) > 10)}")
        )
    env = results.get("environment", {})
    rows = [
        ("sweep file", results.get("sweep_file", "?")),
        ("cells", f"{results.get('done', len(sweep.cells))} finished of {results.get('cells', '?')}"),
        ("datasets", ", ".join(sweep.datasets)),
        ("methods", ", ".join(sweep.methods)),
        ("regimes", ", ".join(sweep.regimes)),
        ("seeds", ", ".join(map(str, ordered(c.seed for c in sweep.cells)))),
        ("test sets", ", ".join(ordered(k for c in sweep.cells for k in c.tests))),
        ("environment", ", ".join(f"{k} {env[k]}" for k in ("lnshift", "torch", "timm", "cuda") if env.get(k))),
    ]
    parts.append(key_values(rows))
    if summary is not None:
        dump = esc(json.dumps(summary.get("sweep", summary), indent=2, default=str))
        parts.append(f"<details><summary>The sweep as parsed (summary.json)</summary><pre>{dump}</pre></details>")
    return Section("summary", "Sweep", "".join(parts))


def sweep_sections(path: Path, figs: Figures) -> tuple[str, str, list[Section]]:
    """Title, subtitle and sections of a sweep's report."""
    results = json.loads((path / "results.json").read_text())
    if not results.get("rows"):
        raise RunDirError(f"{path / 'results.json'} holds no finished cell yet")
    sweep = Sweep([read_cell(row) for row in results["rows"]])
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    sections = [
        summary_section(sweep, results, summary),
        results_section(sweep),
        comparisons_section(sweep),
        figures_section(sweep, figs),
    ]
    return "lnshift sweep", str(path.resolve()), sections
