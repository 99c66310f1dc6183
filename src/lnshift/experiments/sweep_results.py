"""A sweep's results, rebuilt from its finished run directories alone (`lnshift sweep --collect`).

results.csv/json: one row per finished cell (its accuracy, lambda, FSR, shift and chosen options);
summary.csv/json: mean and std over seeds per dataset, method and regime. Shards on different machines
only need a shared OUT.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import rundir as rd
from ..analyses.saved_run import fsr_of_run, run_budget
from ..config import FitConfig, environment
from ..errors import RunDirError
from ..training.fit import changed_options
from ..training.search import SEARCH_JSON
from .sweep_file import Cell, Regime, Sweep, cells

IDENTITY = ("id", "dataset", "method", "regime", "fraction", "shots", "seed", "run")


def check_config(run: rd.RunDir, cfg: FitConfig) -> None:
    """Refuse a finished run made with other options than the sweep now gives (a stale result)."""
    differ = changed_options(run, cfg)
    if differ:
        raise RunDirError(
            f"{run.path} was made with other options than the sweep file now gives ({differ}); "
            "use a new `out:` or delete that run directory"
        )


def collect(sweep: Sweep, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Rebuild results.csv/json and summary.csv/json from the finished run directories (no training)."""
    rows, missing, envs = [], [], {}
    oracle: dict[str, tuple[float, float] | None] = {}
    all_cells = cells(sweep)
    for cell in all_cells:
        run = rd.RunDir(sweep.run_dir(cell.id))
        if not run.done:
            missing.append(cell.id)
            continue
        trained = rd.RunDir(sweep.run_dir(cell.unit))
        check_config(trained, sweep.fit_config(cell))
        env = trained.read_config().get("environment", {})
        envs[json.dumps(env, sort_keys=True)] = env
        if cell.unit not in oracle:
            oracle[cell.unit] = _oracle_fsr(sweep, cell, trained)
        rows.append(_row(cell, run, trained, oracle[cell.unit]))
    common = {"sweep_file": str(sweep.path), "sweep": sweep.raw, "seeds": sweep.seeds, "environment": environment()}
    groups = write_tables(sweep.out, common, rows, missing, len(all_cells), list(envs.values()))
    if echo:
        echo(summary_table(groups))
        echo(f"{len(rows)} of {len(all_cells)} cells finished; results in {sweep.out}")
    return {"rows": rows, "summary": groups, "missing": missing}


def write_tables(
    out: Path, common: dict[str, Any], rows: list[dict[str, Any]], missing: list[str], n_cells: int, envs: list[dict]
) -> list[dict[str, Any]]:
    """results.csv/json (one row per finished cell) and summary.csv/json (mean +- std per group); returns the groups."""
    groups = summarize(rows)
    results = {**common, "run_environments": envs, "cells": n_cells, "done": len(rows), "missing": missing}
    rd.write_json(out / "results.json", {**results, "rows": rows})
    rd.write_text(out / "results.csv", _csv(rows))
    rd.write_json(out / "summary.json", {**common, "groups": groups})
    keys = [k for k in _stat_keys(rows) if any(k in g["metrics"] for g in groups)]
    rd.write_text(out / "summary.csv", _csv([_flat_group(g, keys) for g in groups]))
    return groups


def _oracle_fsr(sweep: Sweep, cell: Cell, trained: rd.RunDir) -> tuple[float, float] | None:
    """(gamma, beta) FSR against the same method and seed at fraction 1.0, when that reference is finished.

    fsr.json of an earlier collect is reused while it names the same reference and is newer than it.
    """
    full = Regime(fraction=1.0)
    if full not in sweep.regimes or not (trained / rd.SHIFT).exists():
        return None
    ref = rd.RunDir(sweep.run_dir(Cell(cell.dataset, cell.base_method, full, cell.seed).unit))
    if not ref.done:
        return None
    cached = trained / rd.FSR
    if cached.exists() and cached.stat().st_mtime >= (ref / rd.DONE).stat().st_mtime:
        report = trained.read_json(rd.FSR)
        if Path(report["budget"].get("reference", "")).resolve() == ref.path.resolve():
            return report["fsr_gamma"], report["fsr_beta"]
    report = fsr_of_run(trained.path, ref.path)
    return report.fsr_gamma, report.fsr_beta


def _row(cell: Cell, run: rd.RunDir, trained: rd.RunDir, oracle: tuple[float, float] | None) -> dict[str, Any]:
    tunes_ln = (trained / rd.SHIFT).exists()
    estimate = trained.read_json(rd.FSR_ESTIMATE) if (trained / rd.FSR_ESTIMATE).exists() else {}
    row: dict[str, Any] = {
        "id": cell.id,
        "dataset": cell.dataset,
        "method": cell.method,
        "regime": cell.regime.label,
        "fraction": cell.regime.fraction,
        "shots": cell.regime.shots,
        "seed": cell.seed,
        "run": str(run.path),
        "n_train": len(trained.read_json(rd.SPLITS)["splits"]["train"]["indices"]),
        "steps": run_budget(trained)["steps"],
        "lambda": run.read_json(rd.LAMBDA)["lambda"] if (run / rd.LAMBDA).exists() else (1.0 if tunes_ln else None),
        "fsr_oracle": oracle[0] if oracle else None,
        "fsr_oracle_beta": oracle[1] if oracle else None,
        "fsr_est": estimate.get("fsr_est"),
        "fsr_est_std": estimate.get("fsr_std"),
        **_shift(trained),
        **_chosen(trained),
    }
    metrics = run.read_json(rd.METRICS)
    splits = {"val": metrics["val"], **{f"test.{k}": v for k, v in metrics.get("test", {}).items()}}
    for split, values in splits.items():
        for name, value in values.items():
            if name != "n" and _is_number(value):
                row[f"{split}.{name}"] = value
    return row


def _shift(trained: rd.RunDir) -> dict[str, Any]:
    """The LayerNorm shift the training learned (before any lambda): the paper's Shift_ln and its gamma and beta
    parts, so a results table can compare shifts across datasets and models without the run directories."""
    if not (trained / rd.SHIFT).exists():
        return {}
    report = trained.read_json(rd.SHIFT)
    return {key: report[key] for key in ("shift_ln", "shift_gamma", "shift_beta")}


def _chosen(trained: rd.RunDir) -> dict[str, Any]:
    """The learning rate a run trained with and, after a search, each searched option's grid and whether the
    chosen value sits at its edge."""
    saved = FitConfig.from_dict(trained.read_config()["fit"], str(trained / rd.CONFIG))
    row: dict[str, Any] = {"lr": saved.optim.lr}
    if (trained / SEARCH_JSON).exists():
        result = trained.read_json(SEARCH_JSON)
        for option, grid in result["grid"].items():
            row[option] = result["chosen"][option]
            row[f"{option}_grid"] = " ".join(f"{v:g}" for v in grid)
            row[f"{option}_at_edge"] = option in result["at_edge"]
            row[f"{option}_failed"] = sum(c["status"] == "failed" for c in result["candidates"])
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample std (None for one seed) and count per (dataset, method, regime); NaN, inf and None are left out."""
    from ..report.stats import mean_std  # here: the report package imports matplotlib

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["regime"]), []).append(row)
    keys, out = _stat_keys(rows), []
    for (dataset, method, regime), members in groups.items():
        stats = {}
        for key in keys:
            values = [r[key] for r in members if _is_number(r.get(key)) and math.isfinite(r[key])]
            if values:
                mean, std = mean_std(values)
                stats[key] = {"mean": mean, "std": None if math.isnan(std) else std, "n": len(values)}
        out.append(
            {
                "dataset": dataset,
                "method": method,
                "regime": regime,
                "n": len(members),
                "seeds": [r["seed"] for r in members],
                "metrics": stats,
            }
        )
    return out


def _stat_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The columns that are summarised, in row order (numbers first, then the metrics of each split)."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in IDENTITY))


def _flat_group(group: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """One summary.csv line; every group has the same columns, blank where a metric does not apply."""
    flat = {k: group[k] for k in ("dataset", "method", "regime", "n")}
    for key in keys:
        s = group["metrics"].get(key, {})
        flat[f"{key}.mean"], flat[f"{key}.std"] = s.get("mean"), s.get("std")
    return flat


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summary_table(groups: list[dict[str, Any]]) -> str:
    """Accuracy mean ± std over seeds, one line per (dataset, method, regime)."""
    lines = []
    for g in groups:
        accs = [
            f"{k.removesuffix('.accuracy').removeprefix('test.')} {s['mean']:.3f}"
            + (f"±{s['std']:.3f}" if s["std"] is not None else "")
            for k, s in g["metrics"].items()
            if k.endswith(".accuracy")
        ]
        lam = g["metrics"].get("lambda")
        extra = f"  lambda {lam['mean']:.2f}" if lam and g["method"].partition("+")[2] else ""
        lines.append(f"{g['dataset']:<14} {g['method']:<12} {g['regime']:<8} n={g['n']}  " + "  ".join(accs) + extra)
    return "\n".join(lines)
