"""Batched runs with their run directories: the runs of configs that differ only in seed, data amount, lr
and out, trained together (batched.py) and each written as `lnshift fit` writes it.

With `epochs`, runs on different amounts of data have different lengths: the runs of equal length train
together. Batched runs keep their last state (as `fit --select last`): there is no validation-based
epoch choice, and no lambda rescaling between cycles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .. import rundir as rd
from ..config import FitConfig, environment
from ..data.device import DeviceBatches, DeviceImages
from ..errors import ConfigError
from .batched import Batches, batched_plans, diverged, initial_states, train_runs
from .fit import tensor_meta, write_outcome
from .ingredients import (
    Data,
    build_model,
    epoch_samples,
    load_configured_backbone,
    load_images,
    prepare_data,
    resolved,
    run_length,
    trained_names,
)
from .loop import PhasePlan, epoch_seed, restore


def runs_by_length(lengths: Sequence[int]) -> dict[int, list[int]]:
    """The indices of the runs of each length, shortest first: runs of one length train in one pass."""
    return {n: [r for r, length in enumerate(lengths) if length == n] for n in sorted(set(lengths))}


def fit_batched(cfgs: Sequence[FitConfig], device: torch.device, *, score_tests: bool = True) -> list[rd.RunDir]:
    """Train the runs of `cfgs` in one batched pass and write each one's run directory as fit() does.

    The configs may differ only in seed, fraction / shots, lr and out (a sweep's seeds, regimes and
    learning-rate candidates of one dataset and method); they need `select: last` and the device
    input pipeline. A run that diverges gets no DONE but a FAILED file saying so; the others are
    unharmed. `score_tests=False` leaves the test sets unscored (a search's candidates). With `epochs`
    instead of `steps`, a run's length is fit's (epochs x the steps of one pass over its training
    split), and the runs of each length are trained together, shortest first. Each run gets the
    batches fit would give it, so it is the run `lnshift fit` makes with its config, up to float
    rounding (tested); its config.yaml says it was batched.
    A randomly initialised backbone differs per seed, so then each seed's runs form their own batch.
    Returns the run directories in the order of `cfgs`.
    """
    first = cfgs[0]
    _check_batchable(cfgs)
    backbone = load_configured_backbone(first, device, training=True)
    other_seeds = sorted({cfg.optim.seed for cfg in cfgs} - {first.optim.seed})
    if other_seeds and _depends_on_seed(backbone, first.replace(seed=other_seeds[0])):
        # a randomly initialised backbone differs per seed: only runs of one seed can share it
        seeds = sorted({c.optim.seed for c in cfgs})
        by_seed = [fit_batched([c for c in cfgs if c.optim.seed == s], device, score_tests=score_tests) for s in seeds]
        done = {run.path: run for runs in by_seed for run in runs}
        return [done[rd.RunDir(cfg.runtime.out).path] for cfg in cfgs]
    config = backbone.data_config
    datas = _shared_data(cfgs, config, score_tests)
    classes = datas[0].classes
    for cfg, data in zip(cfgs, datas, strict=True):
        if data.classes != classes:
            raise ConfigError(
                f"{cfg.runtime.out}: its classes differ from {first.runtime.out}'s; they cannot be batched"
            )
        if len(data.train) == 0:
            raise ConfigError(f"{cfg.runtime.out}: the training split is empty")
    starts = initial_states(first, backbone, len(classes), [cfg.optim.seed for cfg in cfgs])
    model = build_model(first, backbone, len(classes)).to(device)
    loaded: dict[int, Data] = {}  # runs that share their data (a learning-rate grid) share its images
    for d, cfg in zip(datas, cfgs, strict=True):
        if id(d) not in loaded:
            loaded[id(d)] = load_images(d, cfg, device, config, "device")
    datas = [loaded[id(d)] for d in datas]
    lengths = [run_length(cfg, data.train) for cfg, data in zip(cfgs, datas, strict=True)]
    passes = runs_by_length(lengths)
    budgets = {n: first.replace(steps=n) for n in passes}  # fit's budgets as step counts
    plans = {n: batched_plans(model, budget) for n, budget in budgets.items()}
    tuned: dict[int, dict[str, Tensor]] = {}
    for n, group in passes.items():
        order = _fit_order([datas[r].train for r in group], [cfgs[r] for r in group], plans[n])
        lrs = [cfgs[r].optim.lr for r in group]
        states = train_runs(model, [starts[r] for r in group], order, budgets[n], device, lrs)
        tuned.update(zip(group, states, strict=True))
    names = trained_names(plans[lengths[0]])
    phases = {
        n: [{"phase": p.phase.name, "strategy": p.phase.strategy, "steps": p.steps} for p in ps]
        for n, ps in plans.items()
    }
    meta = tensor_meta(model, first, classes)
    norms = [m for m in meta["norms"] if f"{m}.weight" in names]
    runs = []
    for r, (cfg, data, start) in enumerate(zip(cfgs, datas, starts, strict=True)):
        run = rd.RunDir(cfg.runtime.out)
        run.prepare(resume=False, overwrite=True)  # an unfinished earlier attempt is trained again
        log = rd.EventLog(run, None)
        log.event("start", resume=False)
        batched = {
            "with": [cfgs[q].runtime.out for q in passes[lengths[r]]],
            "how": BATCHED_HOW,
        }  # its pass, itself too
        config = {"fit": cfg.to_dict(), "environment": environment(), "batched": batched}
        rd.write_yaml(run / rd.CONFIG, {**config, "resolved": resolved(backbone, "device")})
        rd.write_json(run / rd.SPLITS, data.splits)
        rd.write_tensors(run / rd.BASE, start, meta)
        log.info(f"trained in one batched pass with {len(batched['with']) - 1} other run(s): {BATCHED_HOW}")
        runs.append(run)
        if diverged([tuned[r]]):  # no DONE: a search records it as failed, a plain sweep cell trains it again
            lr = cfg.optim.lr
            error = f"NonFiniteLossError: diverged to non-finite values at lr {lr:g} (lower --lr or check the data)"
            rd.write_text(run / rd.FAILED, error + "\n")
            log.info(error)
            continue
        restore(model, tuned[r])
        write_outcome(run, model, names, norms, start, meta, data, cfg, device, log, phases[lengths[r]])
    return runs


BATCHED_HOW = (
    "lnshift.training.multirun: one forward over all runs' batches; each run gets the batches, phases and optimiser "
    "steps that `lnshift fit --select last` gives it (device input pipeline), up to float rounding"
)
BATCHED_ALLOWED = {"seed", "fraction", "shots", "lr", "out", "resume", "overwrite"}
BATCHED_METHODS = ("lp", "ln", "lp-ln", "cyclic", "cyclic-kx")


def _shared_data(cfgs: Sequence[FitConfig], data_config: dict, score_tests: bool) -> list[Data]:
    """Each run's data, prepared once per distinct data (runs differing only in lr or out share it); without
    `score_tests` the test sets are neither decoded nor kept (they are scored for a search's chosen run only)."""
    by_key: dict[str, Data] = {}
    datas = []
    for cfg in cfgs:
        key = json.dumps({k: v for k, v in cfg.options().items() if k not in ("lr", "out")}, sort_keys=True)
        if key not in by_key:
            data = prepare_data(cfg, data_config)
            by_key[key] = data if score_tests else replace(data, tests={})
        datas.append(by_key[key])
    return datas


def _depends_on_seed(backbone: nn.Module, other: FitConfig) -> bool:
    """Whether the backbone loaded with another seed differs (random initialisation, no pretrained weights)."""
    theirs = load_configured_backbone(other).state_dict()
    return any(not torch.equal(t, theirs[k]) for k, t in backbone.state_dict().items())


def _check_batchable(cfgs: Sequence[FitConfig]) -> None:
    first = cfgs[0].options()
    for cfg in cfgs:
        differ = sorted(k for k, v in cfg.options().items() if k not in BATCHED_ALLOWED and v != first[k])
        if differ:
            raise ConfigError(
                f"batched runs may differ only in {sorted(BATCHED_ALLOWED)}; {cfg.runtime.out} differs in {differ}"
            )
    cfg = cfgs[0]
    if cfg.optim.select != "last":
        raise ConfigError("batched runs keep their last state: set select: last")
    if cfg.method.lam is not None:
        raise ConfigError("batched runs are trained without --lambda; rescale them afterwards (lnshift rescale)")
    if cfg.data.augment == "strong" or cfg.data.input_pipeline == "workers":
        raise ConfigError(
            "batched runs use the device input pipeline: set input_pipeline: device or auto (and no augment: strong)"
        )


def _fit_order(trains: Sequence[DeviceImages], cfgs: Sequence[FitConfig], plans: Sequence[PhasePlan]) -> Batches:
    """batch(step) giving each run the batches fit gives it: per phase, epochs seeded by (seed, phase, epoch).

    Runs on the same images with the same seed (a learning-rate grid) get the same batches: each is drawn once.
    """
    starts = [sum(p.steps for p in plans[:i]) for i in range(len(plans))]
    keys = [(id(x), cfg.optim.seed) for x, cfg in zip(trains, cfgs, strict=True)]
    first = {key: r for r, key in reversed(list(enumerate(keys)))}  # a run that draws each distinct stream
    streams: dict[tuple[int, int], Iterator[tuple[Tensor, Tensor]]] = {}

    def batch(step: int) -> list[tuple[Tensor, Tensor]]:
        if step in starts:  # a phase begins: fit starts its epochs afresh
            phase = starts.index(step)
            streams.update({key: _phase_stream(trains[r], cfgs[r], phase) for key, r in first.items()})
        drawn = {key: next(stream) for key, stream in streams.items()}
        return [drawn[key] for key in keys]

    return batch


def _phase_stream(images: DeviceImages, cfg: FitConfig, phase: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless full batches of one run in one phase, epoch after epoch, each seeded as fit seeds it."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(epoch_seed(cfg.optim.seed, phase, epoch))
        samples = epoch_samples(images, cfg)
        yield from DeviceBatches(images, cfg.optim.batch_size, train=True, num_samples=samples, generator=generator)
        epoch += 1
