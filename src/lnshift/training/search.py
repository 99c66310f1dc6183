"""Hyperparameter selection on validation: one candidate run per grid point; the best becomes the run.

`lnshift fit --lr 1e-3,1e-2` (or `--lr auto`, or `--search '{lr: auto, weight_decay: [0, 0.05]}'`)
trains every combination on the same split, subset and seed, each as a complete run directory under
OUT/search/<label>/ with its test sets left unscored. The candidate with the best validation metric
(`--select-metric`; ties go to the smaller value) becomes the run: OUT takes its trained tensors and is
finished exactly as a plain training with those values finishes (test sets, then any final lambda and
FSR estimate in pipeline.py: the same code on the same tensors, so the same numbers). search.json
records every candidate's values, validation metrics, steps, wall time and status. A candidate that
diverges is recorded as failed, not fatal (its folder holds FAILED); only when every candidate fails
does the search stop. A killed search resumes (`--resume`): finished candidates are reused, failed
ones are not tried again.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import rundir as rd
from ..config import SELECT_METRICS, FitConfig, environment
from ..errors import LNShiftError
from . import distributed as dist
from .fit import build, finish, start_run, train_run
from .loop import NonFiniteLossError, restore, seed_everything

SEARCH_DIR = "search"
SEARCH_JSON = "search.json"
# what a candidate may fail with without stopping the search: it diverged, or it did not fit in memory
CANDIDATE_FAILURES = (NonFiniteLossError, torch.OutOfMemoryError)


class SearchError(LNShiftError):
    """Every candidate of a search failed."""


def candidates(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, ascending (the first option varies slowest)."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def label(values: dict[str, Any]) -> str:
    """A candidate's name and folder: 'lr=0.01' or 'lr=0.01,weight_decay=0'."""
    return ",".join(f"{k}={v:g}" for k, v in values.items())


def candidate_config(cfg: FitConfig, values: dict[str, Any]) -> FitConfig:
    """The plain run a candidate is: the grid's values set, no grid, its own folder, and no lambda at the
    end (the chosen run gets it); lambda between cycles shapes training, so it stays."""
    return cfg.replace(
        **values,
        search={},
        out=str(Path(cfg.runtime.out) / SEARCH_DIR / label(values)),
        lam=cfg.method.lam if cfg.method.lambda_each_cycle else None,
        resume=False,
        overwrite=False,
    )


def pending_candidates(cfg: FitConfig) -> list[FitConfig]:
    """The candidates of a search still to train: neither finished nor failed (for a batched pass; the search
    itself then finds them done and finishes the chosen one)."""
    todo = [candidate_config(cfg, values) for values in candidates(cfg.optim.search)]
    return [c for c in todo if not rd.RunDir(c.runtime.out).done and not (Path(c.runtime.out) / rd.FAILED).exists()]


def best(records: list[dict[str, Any]], metric: str) -> int | None:
    """Index of the best finished candidate by its validation `metric`; ties go to the earliest (smaller values)."""
    sign = 1.0 if SELECT_METRICS[metric] else -1.0
    scored = [
        (sign * r["val"][metric], -i)
        for i, r in enumerate(records)
        if r["status"] == "done" and isinstance(r["val"].get(metric), float) and math.isfinite(r["val"][metric])
    ]
    return -max(scored)[1] if scored else None


def at_edge(grid: dict[str, list], chosen: dict[str, Any]) -> list[str]:
    """The options whose chosen value is the smallest or largest of a grid of 3 or more: widen the grid."""
    return [k for k, v in chosen.items() if len(grid[k]) >= 3 and v in (grid[k][0], grid[k][-1])]


def fit_search(cfg: FitConfig, device: torch.device, echo: Callable[[str], None] | None) -> rd.RunDir:
    """Train every candidate of `cfg.optim.search`, keep the best on validation, finish OUT as its plain run."""
    run, log = start_run(cfg, echo)
    grid, metric = cfg.optim.search, cfg.optim.select_metric
    combos = candidates(grid)
    log.info(f"search: {len(combos)} candidates of {grid}, selected on validation {metric}")
    records = []
    for i, values in enumerate(combos, 1):
        record = _run_candidate(candidate_config(cfg, values), values, device)
        records.append(record)
        _write(run, cfg, records, None)
        shown = f"val {metric} {record['val'][metric]:.4f}" if record["status"] == "done" else record["error"]
        log.info(f"candidate {i}/{len(combos)} {record['label']}: {shown} ({record['wall_s']:.1f} s)")
    k = best(records, metric)
    if k is None:
        failures = "; ".join(f"{r['label']}: {r.get('error', 'no finite ' + metric)}" for r in records)
        raise SearchError(f"{run.path}: all {len(records)} candidates of the search failed ({failures})")
    chosen = cfg.replace(**combos[k])
    _write(run, cfg, records, k)
    if dist.is_main():
        rd.write_yaml(
            run / rd.CONFIG,
            {
                "fit": chosen.to_dict(),
                "search": {"chosen": combos[k], "metric": metric, "candidates": SEARCH_JSON},
                "environment": environment(),
                "command": sys.argv,
            },
        )
    edge = at_edge(grid, combos[k])
    log.info(
        f"chosen {records[k]['label']} (best validation {metric})"
        + (f"; at the edge of the grid for {edge}" if edge else "")
    )
    promote(chosen, rd.RunDir(run / records[k]["run"]), run, log, device)
    return run


def promote(cfg: FitConfig, candidate: rd.RunDir, run: rd.RunDir, log: rd.EventLog, device: torch.device) -> None:
    """Finish `run` as training with the chosen values finishes, from the candidate's trained tensors."""
    seed_everything(cfg.optim.seed)
    trainee = build(cfg, device, run, log)
    tensors = dist.from_main(lambda: candidate.read_tensors(rd.ADAPTER)[0])
    restore(trainee.model, tensors)
    phases = dist.from_main(lambda: candidate.read_json(rd.CYCLES)["phases"])
    finish(trainee, cfg, device, phases, score_tests=True)


def _run_candidate(cfg: FitConfig, values: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train (or reuse, or resume) one candidate; its record for search.json."""
    cand = rd.RunDir(cfg.runtime.out)
    record: dict[str, Any] = {"values": values, "label": label(values), "run": f"{SEARCH_DIR}/{label(values)}"}
    start = time.time()
    done, failed, started = dist.from_main(
        lambda: (cand.done, (cand / rd.FAILED).is_file(), cand.path.exists() and any(cand.path.iterdir()))
    )
    if failed:  # seen to fail before (here or in a batched pass): it would fail again
        error = dist.from_main(lambda: (cand / rd.FAILED).read_text().strip())
        return {**record, "status": "failed", "error": error, "wall_s": 0.0}
    if not done:
        try:
            train_run(cfg.replace(resume=started), device, None, score_tests=False)
        except CANDIDATE_FAILURES as e:
            error = f"{type(e).__name__}: {e}"
            if dist.is_main():
                rd.write_text(cand / rd.FAILED, error + "\n")
            return {**record, "status": "failed", "error": error, "wall_s": time.time() - start}
    val, phases, wall = dist.from_main(
        lambda: (cand.read_json(rd.METRICS)["val"], cand.read_json(rd.CYCLES)["phases"], _wall_time(cand))
    )
    return {**record, "status": "done", "val": val, "steps": sum(p["steps"] for p in phases), "wall_s": wall}


def _wall_time(run: rd.RunDir) -> float:
    """Seconds from a run's first start to its end, from events.jsonl (a resumed run includes its pause)."""
    events = [json.loads(line) for line in (run / rd.EVENTS).read_text().splitlines() if line.strip()]
    return events[-1]["time"] - events[0]["time"]


def _write(run: rd.RunDir, cfg: FitConfig, records: list[dict[str, Any]], chosen: int | None) -> None:
    if not dist.is_main():
        return
    result: dict[str, Any] = {
        "metric": cfg.optim.select_metric,
        "selected_on": "validation",
        "grid": cfg.optim.search,
        "candidates": records,
        "chosen": None if chosen is None else records[chosen]["values"],
    }
    if chosen is not None:
        result["at_edge"] = at_edge(cfg.optim.search, records[chosen]["values"])
    rd.write_json(run / SEARCH_JSON, result)
