"""`lnshift sweep FILE`: a benchmark protocol (datasets x methods x regimes x seeds) as one restartable job.

Every cell is a run directory OUT/runs/<dataset>/<method>/<regime>/s<seed>. A `+auto` / `+fsr` method
reuses the run of its base method (`ln+auto` rescales `ln`'s run), so rescaled variants cost no extra
training; a base run and its rescaled variants form one *unit*, and a unit is never split across
shards, so concurrent shards never write the same directory. Results are rebuilt from the run
directories alone (`collect`), so shards on different machines only need a shared OUT. Within one
machine, worker processes (lnshift.experiments.workers: K per GPU) take whole units from a shared queue.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import rundir as rd
from ..analyses.saved_run import estimate_fsr_of_run, fsr_of_run, rescale_run, run_budget
from ..config import ALIASES, SEARCHABLE, FitConfig, environment, flat_options, load_yaml, unknown_options
from ..errors import ConfigError, RunDirError
from ..pipeline import fit
from ..training.evaluate import resolve_device
from ..training.fit import changed_options
from ..training.phases import METHODS
from ..training.search import SEARCH_JSON, candidates, pending_candidates
from .workers import WorkerPool, worker_count

TOP_KEYS = ("out", "base", "datasets", "methods", "regimes", "seeds")
OPTIONAL_KEYS = ("search",)
# options each cell sets itself; a sweep file may not fix them in `base:` or a dataset
SWEPT = ("method", "fraction", "shots", "seed", "out", "resume", "overwrite", "lam", "subset", "subset_seed", "search")
RESCALES = ("auto", "fsr")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
IDENTITY = ("id", "dataset", "method", "regime", "fraction", "shots", "seed", "run")
SWEEP_COPY = "sweep.yaml"


@dataclass(frozen=True)
class Regime:
    """How much training data a cell gets: a stratified fraction or K shots per class."""

    fraction: float | None = None
    shots: int | None = None

    @property
    def label(self) -> str:
        return f"f{self.fraction:g}" if self.fraction is not None else f"shots{self.shots}"


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str  # as listed in the sweep, e.g. "ln+auto"
    regime: Regime
    seed: int

    @property
    def base_method(self) -> str:
        return self.method.partition("+")[0]

    @property
    def rescale(self) -> str | None:
        """'auto' or 'fsr' for a rescaled variant of the base method's run."""
        return self.method.partition("+")[2] or None

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.method}/{self.regime.label}/s{self.seed}"

    @property
    def unit(self) -> str:
        """The id of the trained run this cell reads (its own for a plain method)."""
        return f"{self.dataset}/{self.base_method}/{self.regime.label}/s{self.seed}"


@dataclass
class Sweep:
    path: Path
    text: str  # the file exactly as written, copied beside the results
    raw: dict[str, Any]
    out: Path
    base: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    methods: list[str]
    regimes: list[Regime]
    seeds: list[int]
    search: dict[str, Any] = dataclasses.field(default_factory=dict)  # {option: grid} and {method: {option: grid}}

    def search_for(self, method: str) -> dict[str, Any]:
        """The grid a method's cells choose on validation: the file's global one, or the method's own."""
        common = {k: v for k, v in self.search.items() if k in SEARCHABLE}
        return dict(self.search.get(method, common))

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id

    def fit_config(self, cell: Cell) -> FitConfig:
        """The FitConfig of the cell's trained run: defaults < base < dataset < the cell's own options."""
        options = {"test": {}, "progress": False, **self.base, **self.datasets[cell.dataset]}
        options.update(
            method=cell.base_method,
            fraction=cell.regime.fraction,
            shots=cell.regime.shots,
            seed=cell.seed,
            out=str(self.run_dir(cell.unit)),
            search=self.search_for(cell.base_method),
        )
        return FitConfig.from_dict(options, source=str(self.path))


# ---------------------------------------------------------------- loading and validation


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the file and the key at fault.

    Args:
        path: the sweep YAML (datasets x methods x regimes x seeds; docs/sweep.md).
    """
    path = Path(path)
    raw = load_yaml(path)
    text = path.read_text()

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {message}")

    unknown = sorted(set(raw) - set(TOP_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key; a sweep file has {list(TOP_KEYS)} and optionally {list(OPTIONAL_KEYS)}")
    missing = [k for k in TOP_KEYS if k not in raw]
    if missing:
        raise fail(missing[0], "required key is missing")
    if not isinstance(raw["out"], str) or not raw["out"]:
        raise fail("out", f"expected a directory name, got {raw['out']!r}")
    base = _options(raw["base"] or {}, "base", fail)
    try:
        FitConfig.from_dict({"test": {}, **base}, source=str(path))
    except ConfigError as e:
        raise fail("base", str(e)) from None
    if not isinstance(raw["datasets"], dict) or not raw["datasets"]:
        raise fail("datasets", "expected a non-empty mapping of dataset name -> options")
    datasets = {}
    for name, opts in raw["datasets"].items():
        key = f"datasets.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise fail(key, "a dataset name must be letters, digits, '_', '.' or '-' (it names a folder)")
        datasets[name] = _options(opts, key, fail)
        if "train" not in datasets[name]:
            raise fail(f"{key}.train", "required key is missing")
        test = datasets[name].get("test", base.get("test", {}))
        if not isinstance(test, dict) or not all(isinstance(v, str) for v in test.values()):
            raise fail(f"{key}.test", f"expected a mapping of test-set name -> data spec, got {test!r}")
    methods = _unique_list(raw["methods"], "methods", fail)
    regimes = [_regime(r, f"regimes[{i}]", fail) for i, r in enumerate(_unique_list(raw["regimes"], "regimes", fail))]
    if len({r.label for r in regimes}) < len(regimes):
        raise fail("regimes", "two regimes are the same")
    seeds = _unique_list(raw["seeds"], "seeds", fail)
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise fail("seeds", f"expected non-negative integers, got {seed!r}")
    for method in methods:
        base_method, plus, rescale = str(method).partition("+")
        if base_method not in METHODS or (plus and rescale not in RESCALES):
            raise fail(
                "methods", f"unknown method {method!r}; choose from {list(METHODS)}, or LN ones with +auto / +fsr"
            )
    search = _search(raw.get("search") or {}, fail)
    sweep = Sweep(path, text, raw, Path(raw["out"]), base, datasets, methods, regimes, seeds, search)
    for name in datasets:  # FitConfig's own checks, once per dataset and method, before anything runs
        for method in methods:
            cell = Cell(name, method, regimes[0], seeds[0])
            try:
                cfg = sweep.fit_config(cell)
            except ConfigError as e:
                raise fail(f"datasets.{name}", str(e)) from None
            try:
                if cell.rescale:
                    cfg.replace(lam=cell.rescale)
            except ConfigError as e:
                raise fail("methods", f"{method!r}: {e}") from None
    return sweep


def _search(value: Any, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    """`search:` holds grids {option: [values] or auto} for every method, and {method: {option: grid}} for one."""
    if not isinstance(value, dict):
        raise fail("search", f"expected a mapping {{option: [values] or auto}} or {{method: {{...}}}}, got {value!r}")
    for key, grid in value.items():
        if key in METHODS:
            if not isinstance(grid, dict) or not set(grid) <= set(SEARCHABLE):
                raise fail(f"search.{key}", f"expected {{option: [values] or auto}} ({list(SEARCHABLE)}), got {grid!r}")
        elif key not in SEARCHABLE:
            raise fail(f"search.{key}", f"neither a searchable option {list(SEARCHABLE)} nor a method {list(METHODS)}")
    return dict(value)


def _options(opts: Any, key: str, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise fail(key, f"expected a mapping of fit options, got {opts!r}")
    unknown = unknown_options(opts)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", "not a fit option (see `lnshift fit --help`, with underscores)")
    options = flat_options(opts, key)  # flat, or by section as in a run's config.yaml
    for name in options:
        shown = next((k for k in opts if ALIASES.get(k, k) == name), name)  # `lambda` as written
        if name == "search":
            raise fail(f"{key}.search", "grids go in the sweep's top-level `search:` (for every method or per method)")
        if name in SWEPT:
            raise fail(f"{key}.{shown}", "is set per cell by the sweep (methods, regimes, seeds, out)")
        if name == "devices":
            raise fail(f"{key}.devices", "a sweep trains each cell on one GPU; use `lnshift sweep --devices N`")
    return options


def _unique_list(value: Any, key: str, fail: Callable[[str, str], ConfigError]) -> list:
    if not isinstance(value, list) or not value:
        raise fail(key, f"expected a non-empty list, got {value!r}")
    seen = [json.dumps(v, sort_keys=True, default=str) for v in value]
    if len(set(seen)) < len(seen):
        raise fail(key, "lists the same entry twice")
    return value


def _regime(value: Any, key: str, fail: Callable[[str, str], ConfigError]) -> Regime:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("fraction", "shots"):
        raise fail(key, f"expected {{fraction: F}} or {{shots: K}}, got {value!r}")
    [(kind, amount)] = value.items()
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise fail(f"{key}.{kind}", f"expected a number, got {amount!r}")
    if kind == "fraction":
        if not 0 < amount <= 1:
            raise fail(f"{key}.fraction", f"must be in (0, 1], got {amount}")
        return Regime(fraction=float(amount))
    if amount != int(amount) or amount < 1:
        raise fail(f"{key}.shots", f"must be an integer >= 1, got {amount}")
    return Regime(shots=int(amount))


# ---------------------------------------------------------------- cells and shards


def cells(sweep: Sweep) -> list[Cell]:
    """Every cell, in file order: datasets x methods x regimes x seeds."""
    return [Cell(d, m, r, s) for d in sweep.datasets for m in sweep.methods for r in sweep.regimes for s in sweep.seeds]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1 <= I <= N) -> (I, N): the form of `--shard $SLURM_ARRAY_TASK_ID/$N`."""
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index = count = 0
    if not sep or not 1 <= index <= count:
        raise ConfigError(f"--shard expects I/N with 1 <= I <= N (e.g. 2/8), got {text!r}")
    return index, count


def shard_cells(all_cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """The I-th of N disjoint slices: units (a trained run and its rescaled variants) sorted by id, every N-th."""
    index, count = shard
    if not 1 <= index <= count:
        raise ConfigError(f"shard {index}/{count}: expected 1 <= I <= N")
    units = sorted({c.unit for c in all_cells})
    mine = set(units[index - 1 :: count])
    return [c for c in all_cells if c.unit in mine]


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class Job:
    """A unit to run: its trained run's id, its cells, and its place in the sweep for the log."""

    label: str
    unit: str
    members: list[Cell]
    candidates: int = 1  # runs of its search (1: no search)

    @property
    def weight(self) -> int:
        """Rough cost in trainings: its run (or its search's candidates), plus the nested-subset runs of an FSR
        estimate."""
        return self.candidates + 3 * any(c.rescale == "fsr" for c in self.members)


def run_sweep(
    sweep: Sweep,
    shard: tuple[int, int] | None = None,
    echo: Callable[[str], None] = print,
    devices: int = 1,
    per_device: int = 1,
    datasets: list[str] | None = None,
    batched: bool = False,
    pool: WorkerPool | None = None,
    methods: list[str] | None = None,
) -> Path:
    """Run every unfinished cell (of one shard), then, without a shard, collect the results; returns OUT.

    A finished cell (DONE) is skipped, an interrupted training resumes from its checkpoint. A failing
    unit does not stop the others; the failures are raised together at the end.

    Args:
        sweep: the grid, from `load_sweep`.
        shard: (I, N): run only the I-th of N disjoint slices, and collect nothing.
        echo: where progress lines go.
        devices, per_device: with more than one worker (`devices` GPUs x `per_device` processes each)
            the workers take units from a shared queue: a small model leaves a GPU mostly idle, so
            several of its cells can share one.
        datasets: run only these datasets' cells (the results tables still cover, and list as
            missing, every cell).
        methods: run only these methods' cells, as `datasets` does (a rescaled variant such as
            `ln+auto` trains its base run if that is not finished).
        batched: first train the unfinished runs (or search candidates) of lp / ln / lp-ln / cyclic
            units together, one batched pass per dataset and method (lnshift.training.multirun.fit_batched), in
            this process on its device; the rest (other methods, finishing searches, rescaled variants)
            then runs as usual, on the workers if there are any.
        pool: the workers, already started (the CLI starts them before it imports torch); this
            function closes it.
    """
    try:
        workers = worker_count(devices, per_device)
        if pool is None and workers > 1:
            pool = WorkerPool(devices, per_device)
        return _run_sweep(sweep, shard, echo, datasets, batched, pool, methods)
    finally:
        if pool is not None:
            pool.close()


def _run_sweep(
    sweep: Sweep,
    shard: tuple[int, int] | None,
    echo: Callable[[str], None],
    datasets: list[str] | None,
    batched: bool,
    pool: WorkerPool | None,
    methods: list[str] | None = None,
) -> Path:
    rd.write_text(sweep.out / SWEEP_COPY, sweep.text)
    todo = cells(sweep) if shard is None else shard_cells(cells(sweep), shard)
    for field, chosen, known in [("dataset", datasets, list(sweep.datasets)), ("method", methods, sweep.methods)]:
        if chosen is None:
            continue
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise ConfigError(f"--{field}s {','.join(unknown)}: not in {sweep.path} (it has {', '.join(known)})")
        todo = [c for c in todo if getattr(c, field) in chosen]
    units: dict[str, list[Cell]] = {}
    for cell in todo:
        units.setdefault(cell.unit, []).append(cell)
    jobs = [
        Job(f"[{k}/{len(units)}]", unit, members, len(candidates(sweep.fit_config(members[0]).optim.search)))
        for k, (unit, members) in enumerate(units.items(), 1)
    ]
    failed_batches: dict[str, str] = {}
    if batched:
        failed_batches = _train_batched(sweep, jobs, echo)
        jobs = [job for job in jobs if job.unit not in failed_batches]
    if pool is None:
        outcomes: Iterable[tuple[str, str | None]] = ((job.unit, attempt(sweep, job, echo)) for job in jobs)
    else:
        check_gpus(pool.devices, sweep)
        outcomes = pool.run(attempt, {job.unit: (sweep, job) for job in heaviest_first(jobs)}, echo)
    failed = {**failed_batches, **{unit: error for unit, error in outcomes if error is not None}}
    if shard is None:
        collect(sweep, echo)
    else:
        echo(f"shard {shard[0]}/{shard[1]} finished; when every shard has, run `lnshift sweep {sweep.path} --collect`")
    if failed:
        lines = "; ".join(f"{unit}: {msg}" for unit, msg in failed.items())
        raise RunDirError(f"{len(failed)} of {len(units)} runs failed (rerun the sweep to retry them): {lines}")
    return sweep.out


def attempt(sweep: Sweep, job: Job, echo: Callable[[str], None]) -> str | None:
    """Run a unit's unfinished cells; returns the error, if any (one broken cell must not cost a long sweep)."""
    pending = [c for c in job.members if not rd.RunDir(sweep.run_dir(c.id)).done]
    if not pending:
        return None
    start = time.time()
    echo(f"{job.label} {', '.join(c.id for c in pending)}")
    try:
        _run_unit(sweep, job.unit, job.members[0], pending, echo)
    except Exception as e:
        echo(traceback.format_exc())
        return f"{type(e).__name__}: {e}"
    echo(f"{job.label} {job.unit}: {time.time() - start:.1f} s")
    return None


def _train_batched(sweep: Sweep, jobs: list[Job], echo: Callable[[str], None]) -> dict[str, str]:
    """Train the unfinished runs of batchable units, one batched pass per (dataset, method); returns failures."""
    from ..training.multirun import BATCHED_METHODS, fit_batched

    groups: dict[tuple[str, str], dict[str, list[FitConfig]]] = {}
    for job in jobs:
        first = job.members[0]
        if first.base_method in BATCHED_METHODS and not rd.RunDir(sweep.run_dir(job.unit)).done:
            groups.setdefault((first.dataset, first.base_method), {})[job.unit] = _to_train(sweep.fit_config(first))
    failed = {}
    for (dataset, method), members in groups.items():
        start = time.time()
        cfgs = [cfg for unit_cfgs in members.values() for cfg in unit_cfgs]
        echo(f"[batched] {dataset}/{method}: {len(cfgs)} runs of {len(members)} cells, one pass per run length")
        if not cfgs:
            continue
        try:
            fit_batched(cfgs, resolve_device(cfgs[0].runtime.device), score_tests=not sweep.search_for(method))
        except ConfigError:
            raise  # the sweep file asks for what batched runs cannot do: say so before anything else runs
        except Exception as e:
            echo(traceback.format_exc())
            failed.update(dict.fromkeys(members, f"{type(e).__name__}: {e}"))
            continue
        echo(f"[batched] {dataset}/{method}: {time.time() - start:.1f} s")
    return failed


def _to_train(cfg: FitConfig) -> list[FitConfig]:
    """What a batched pass trains for a unit: its run, or the pending candidates of its search."""
    return pending_candidates(cfg) if cfg.optim.search else [cfg]


def heaviest_first(jobs: list[Job]) -> list[Job]:
    """The queue's order: units with an FSR estimate first, so no long unit starts last and runs alone."""
    return sorted(jobs, key=lambda job: -job.weight)


def check_gpus(devices: int, sweep: Sweep) -> None:
    """The machine has the `devices` GPUs the workers were given, and no cell pins a GPU of its own."""
    if not torch.cuda.is_available():
        return  # CPU workers (how the tests exercise the pool)
    if torch.cuda.device_count() < devices:
        raise ConfigError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) visible on this machine")
    for key, options in [("base", sweep.base), *((f"datasets.{k}", v) for k, v in sweep.datasets.items())]:
        if ":" in str(options.get("device", "")):
            raise ConfigError(f"{sweep.path}: {key}.device: --devices gives each worker one GPU; do not pin one")


def _run_unit(sweep: Sweep, unit: str, first: Cell, pending: list[Cell], echo: Callable[[str], None]) -> None:
    """Train (or resume) the unit's run unless it is finished, then write each pending rescaled variant."""
    cfg = sweep.fit_config(first)
    trained = rd.RunDir(sweep.run_dir(unit))
    if trained.done:
        _check_config(trained, cfg)
    else:
        resume = trained.path.is_dir() and any(trained.path.iterdir())
        if resume:
            echo(f"  resuming {trained.path}")
        fit(cfg.replace(resume=resume), echo=None)
    for cell in pending:
        if cell.rescale is None:
            continue
        if cell.rescale == "fsr" and not (trained / rd.FSR_ESTIMATE).exists():
            estimate_fsr_of_run(trained.path, echo=None)
        dest = sweep.run_dir(cell.id)
        if dest.exists():  # an interrupted rescale: cheap to redo, and rescale_run never writes into a used folder
            shutil.rmtree(dest)
        rescale_run(trained.path, cell.rescale, target=cfg.method.lambda_target, out=dest, device=cfg.runtime.device)


def _check_config(run: rd.RunDir, cfg: FitConfig) -> None:
    """Refuse a finished run made with other options than the sweep now gives (a stale result)."""
    differ = changed_options(run, cfg)
    if differ:
        raise RunDirError(
            f"{run.path} was made with other options than the sweep file now gives ({differ}); "
            "use a new `out:` or delete that run directory"
        )


# ---------------------------------------------------------------- results


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
        _check_config(trained, sweep.fit_config(cell))
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
