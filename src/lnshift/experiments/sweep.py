"""`lnshift sweep FILE`: a benchmark protocol (datasets x methods x regimes x seeds) as one restartable job.

Every cell is a run directory OUT/runs/<dataset>/<method>/<regime>/s<seed>. A `+auto` / `+fsr` method
reuses the run of its base method (`ln+auto` rescales `ln`'s run), so rescaled variants cost no extra
training; a base run and its rescaled variants form one *unit*, and a unit is never split across
shards, so concurrent shards never write the same directory. Within one machine, worker processes
(lnshift.experiments.workers: K per GPU) take whole units from a shared queue. The file and its cells are
`sweep_file.py`; the results tables, rebuilt from the run directories alone, `sweep_results.py`.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import rundir as rd
from ..analyses.saved_run import estimate_fsr_of_run, rescale_run
from ..config import FitConfig
from ..errors import ConfigError, RunDirError
from ..pipeline import fit
from ..training.evaluate import resolve_device
from ..training.search import candidates, pending_candidates
from .sweep_file import SWEEP_COPY, Cell, Sweep, cells, shard_cells
from .sweep_results import check_config, collect
from .workers import WorkerPool, worker_count


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
        check_config(trained, cfg)
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
