"""Training one run: backbone -> data -> phases -> loop -> artifacts, top to bottom.

The run directory it writes (see rundir.py) is all that evaluation, shift, FSR, merge and reports read.
A lambda applied once at the end is not training but an analysis of the trained run: training then
leaves the run open (no metrics, no DONE) for pipeline.py to rescale and finish. Lambda between cycles
shapes what later phases learn, so that one is applied here.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .. import rundir as rd
from ..analyses.shift import ShiftReport, layer_shift, rescale
from ..backbones import Backbone, load_backbone, resolve_fast_paths
from ..config import DEVICE_DATA_SHARE, DEVICE_DATA_SHARE_ENV, VAL_SIZES, FitConfig, environment
from ..data import (
    ImageDataset,
    ImageSource,
    Split,
    check_classes,
    check_disjoint,
    find_duplicate_content,
    holdout,
    make_transform,
    matched,
    open_source,
    splits_to_dict,
    subsample,
)
from ..data.builtin import resolve_spec
from ..data.device import DeviceBatches, DeviceImages, estimated_bytes, eval_batches, to_device
from ..errors import ConfigError, DataError, RunDirError
from ..strategies import get_strategy, norm_module_names
from . import distributed as dist
from .evaluate import evaluate, uses_bf16
from .heads import Classifier, build_head
from .lambdas import lambda_record, parse_grid, select_lambda
from .loop import PhasePlan, PhaseState, restore, run_phase, seed_everything, snapshot, store_frozen
from .phases import budget_factor, budget_rule, phase_steps, phases_for

Images = ImageDataset | DeviceImages  # one split in the workers or the device input pipeline
CPU = torch.device("cpu")


@dataclass
class Data:
    classes: list[str]
    train: Images
    val: Images
    tests: dict[str, Images]
    splits: dict[str, Any]

    def named(self) -> dict[str, Images]:
        return {"train": self.train, "val": self.val, **{f"test:{k}": v for k, v in self.tests.items()}}


def open_spec(spec: str, cfg: FitConfig) -> ImageSource:
    return open_source(resolve_spec(spec), root=cfg.data.root)


def prepare_data(cfg: FitConfig, data_config: dict) -> Data:
    """Open every source, draw the seeded splits (group-aware when groups exist), build the datasets."""
    train_src = open_spec(cfg.data.train, cfg)
    classes = train_src.classes
    class_to_idx = {c: i for i, c in enumerate(classes)}
    labels = [s.label for s in train_src.samples]
    groups = [s.group for s in train_src.samples] if train_src.has_groups() else None
    pool = np.arange(len(train_src))
    sources: dict[str, ImageSource] = {cfg.data.train: train_src}
    splits: list[Split] = []

    def take(idx: np.ndarray, fraction: float, seed_offset: int) -> tuple[np.ndarray, np.ndarray]:
        kept, held = holdout(
            [labels[i] for i in idx],
            None if groups is None else [groups[i] for i in idx],
            fraction=fraction,
            seed=cfg.optim.seed + seed_offset,
        )
        return idx[kept], idx[held]

    test_specs = dict(cfg.data.test)
    if cfg.data.test_fraction:
        pool, held_test = take(pool, cfg.data.test_fraction, 2)
        splits.append(Split("test:holdout", cfg.data.train, held_test.tolist()))
    if cfg.data.val:
        val_src = open_spec(cfg.data.val, cfg)
        check_classes(classes, val_src, "val")
        sources[cfg.data.val] = val_src
        val = Split("val", cfg.data.val, list(range(len(val_src))))
    else:
        pool, val_idx = take(pool, cfg.data.val_fraction, 1)
        val = Split("val", cfg.data.train, val_idx.tolist())
    splits.append(val)
    if cfg.data.fraction is not None or cfg.data.shots is not None:
        chosen = subsample(
            [labels[i] for i in pool], fraction=cfg.data.fraction, shots=cfg.data.shots, seed=cfg.optim.seed
        )
        pool = pool[chosen]
    validation = size_validation(cfg, val, sources[val.source], Counter(labels[i] for i in pool))
    if cfg.method.subset is not None:  # nested subsets of the training split, for the FSR estimator
        pool = pool[subsample([labels[i] for i in pool], fraction=cfg.method.subset, seed=cfg.method.subset_seed)]
    splits.insert(0, Split("train", cfg.data.train, sorted(pool.tolist())))
    for name, spec in test_specs.items():
        src = sources.get(spec) or open_spec(spec, cfg)
        check_classes(classes, src, f"test:{name}")
        sources[spec] = src
        splits.append(Split(f"test:{name}", spec, list(range(len(src)))))
    check_disjoint(splits, sources)
    skipped: dict[str, list[str]] = {}
    if cfg.data.skip_bad_images:
        for split in splits:
            src = sources[split.source]
            bad = set(src.find_bad(split.indices))
            if bad:
                skipped[split.name] = sorted(bad)
                split.indices = [i for i in split.indices if src.samples[i].path not in bad]
    seen = [s for s in splits if not s.name.startswith("test:")]  # train and val: what the run learns from
    duplicates = {
        f"{s.name}~{t.name}": pairs
        for t in splits
        if t.name.startswith("test:")
        for s in seen
        if (pairs := find_duplicate_content(sources[s.source], s.indices, sources[t.source], t.indices))
    }

    train_tf = make_transform(data_config, train=True, augment=cfg.data.augment)
    eval_tf = make_transform(data_config, train=False)
    by_name = {s.name: s for s in splits}

    def dataset(name: str, transform: Callable) -> ImageDataset:
        split = by_name[name]
        ds = ImageDataset(sources[split.source], split.indices, class_to_idx, transform, cache=True)
        ds.split = name  # read by the lambda-selection guard
        return ds

    given = cfg.options()
    options = {k: given[k] for k in ("fraction", "shots", "val_fraction", "val_size", "test_fraction", "data_root")}
    return Data(
        classes=classes,
        train=dataset("train", train_tf),
        val=dataset("val", eval_tf),
        tests={s.name.removeprefix("test:"): dataset(s.name, eval_tf) for s in splits if s.name.startswith("test:")},
        splits={
            **splits_to_dict(splits, sources, classes, cfg.optim.seed, options),
            "validation": {**validation, "size": len(val.indices)},
            "skipped_bad_images": skipped,
            "duplicates_with_test": duplicates,
        },
    )


def size_validation(cfg: FitConfig, val: Split, source: ImageSource, train_counts: Counter) -> dict[str, Any]:
    """Apply --val-size to the validation split drawn so far; returns how it was applied, for splits.json.

    `match` cuts validation to the training subset's images per class (before any FSR --subset), so a
    scarce-data run selects (epochs, lambda, ...) on as much labelled data as such a user would hold out.
    """
    drawn_from = (
        f"--val {cfg.data.val}" if cfg.data.val else f"a --val-fraction {cfg.data.val_fraction:g} hold-out of --train"
    )
    record: dict[str, Any] = {
        "rule": cfg.data.val_size,
        "meaning": VAL_SIZES[cfg.data.val_size],
        "drawn_from": drawn_from,
    }
    record["available"] = len(val.indices)
    if cfg.data.val_size == "match":
        if cfg.data.fraction is None and cfg.data.shots is None:
            record["not_applied"] = "no --fraction or --shots: training uses the whole pool, so all of it validates"
        else:
            record["matched_to"] = (
                f"--shots {cfg.data.shots}" if cfg.data.shots is not None else f"--fraction {cfg.data.fraction:g}"
            )
            record["target"] = dict(sorted(train_counts.items()))
            samples = [source.samples[i] for i in val.indices]
            groups = [s.group for s in samples] if source.has_groups() else None
            picked = matched([s.label for s in samples], groups, counts=train_counts, seed=cfg.optim.seed + 3)
            val.indices = [val.indices[k] for k in picked]
    return record


def load_configured_backbone(cfg: FitConfig, device: torch.device = CPU, training: bool = False) -> Backbone:
    """The backbone of a config, with the fast paths --fast-paths gives it for `device` and `training`;
    seeded first, so a randomly initialised one is the same every time it loads."""
    torch.manual_seed(cfg.optim.seed)
    fast_paths = resolve_fast_paths(cfg.runtime.fast_paths, device, training)
    return load_backbone(
        cfg.model.name,
        cfg.model.weights,
        pretrained=cfg.model.pretrained,
        model_kwargs=cfg.model.kwargs,
        fast_paths=fast_paths,
    )


def resolved(backbone: Backbone, pipeline: str) -> dict[str, Any]:
    """config.yaml's `resolved` section: what the `auto` options became on this machine (`fit` keeps them as given)."""
    return {"fast_paths": list(backbone.fast_paths), "input_pipeline": pipeline}


def input_pipeline(cfg: FitConfig, data: Data, device: torch.device, data_config: dict) -> str:
    """Resolve --input-pipeline auto for a run's data: the device pipeline on a GPU when the images fit."""
    return resolve_pipeline(cfg, {name: len(ds) for name, ds in data.named().items()}, device, data_config)


def resolve_pipeline(cfg: FitConfig, sizes: dict[str, int], device: torch.device, data_config: dict) -> str:
    """--input-pipeline auto: the device pipeline on a GPU when splits of these sizes fit, else workers."""
    if cfg.data.input_pipeline != "auto":
        return cfg.data.input_pipeline
    if device.type != "cuda" or cfg.data.augment == "strong":
        return "workers"
    need = sum(estimated_bytes(n, data_config, crops=kept_for_crops(name, cfg)) for name, n in sizes.items())
    share = float(os.environ.get(DEVICE_DATA_SHARE_ENV, DEVICE_DATA_SHARE))
    return "device" if need < share * torch.cuda.mem_get_info(device)[0] else "workers"


def kept_for_crops(split: str, cfg: FitConfig) -> bool:
    """Whether the device pipeline keeps a split for random crops: the training split, unless --augment none."""
    return split == "train" and cfg.data.augment != "none"


def load_images(data: Data, cfg: FitConfig, device: torch.device, data_config: dict, pipeline: str) -> Data:
    """Decode every image once: into memory (workers) or as uint8 tensors on the device (device).

    An undecodable image stops the run with the full list of bad files of its split.
    """
    loaded = {}
    for name, ds in data.named().items():
        try:
            if pipeline == "workers":
                ds.preload()
                loaded[name] = ds
            else:
                loaded[name] = to_device(ds, data_config, device, crops=kept_for_crops(name, cfg))
        except DataError as e:
            bad = ds.source.find_bad(ds.indices)
            listed = ", ".join(bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise DataError(
                f"{len(bad)} image(s) of split {name} ({ds.source.spec}) cannot be decoded: {listed}. "
                "Fix or remove them, or pass --skip-bad-images to skip them (they are listed in splits.json)"
            ) from e
    tests = {k.removeprefix("test:"): v for k, v in loaded.items() if k.startswith("test:")}
    return replace(data, train=loaded["train"], val=loaded["val"], tests=tests)


def build_model(cfg: FitConfig, backbone: nn.Module, num_classes: int) -> Classifier:
    """Backbone + head, with every strategy of the method prepared (e.g. LoRA modules injected)."""
    torch.manual_seed(cfg.optim.seed)  # head initialisation depends on the seed only
    head = build_head(
        cfg.method.head, backbone.feature_dim, backbone.token_dim, num_classes, hidden=cfg.method.head_hidden
    )
    model = Classifier(backbone, head)
    for phase in phases_for(cfg.method.name, cfg.method.cycles):
        get_strategy(phase.strategy).prepare(model, cfg.method.strategy)
    return model


def plan_phases(model: nn.Module, cfg: FitConfig, total: int) -> list[PhasePlan]:
    """The method's phases, each with the tensors it trains and its share of the `total` budget (cyclic-kx: all)."""
    phases = phases_for(cfg.method.name, cfg.method.cycles, rescale_each_cycle=cfg.method.lambda_each_cycle)
    budgets = phase_steps(cfg.method.name, cfg.method.cycles, total)
    return [
        PhasePlan(i, phase, get_strategy(phase.strategy).select(model, cfg.method.strategy), steps)
        for i, (phase, steps) in enumerate(zip(phases, budgets, strict=True))
    ]


def trained_names(plans: list[PhasePlan]) -> list[str]:
    """Ordered union of every phase's trainable tensors: what adapter.safetensors holds."""
    return list(dict.fromkeys(n for p in plans for n in p.trainable))


def run_length(cfg: FitConfig, train: Images) -> int:
    """A run's optimiser steps: --steps, or --epochs passes of epoch_samples over its training split."""
    if cfg.optim.steps is not None:
        return cfg.optim.steps
    return cfg.optim.epochs * -(-epoch_samples(train, cfg) // cfg.optim.batch_size)


def epoch_samples(dataset: Images, cfg: FitConfig) -> int:
    """An epoch is one pass over the training split, but at least --min-epoch-steps batches.

    Few-shot splits would otherwise validate, checkpoint and restart loaders after every step.
    """
    return max(len(dataset), cfg.optim.batch_size * cfg.optim.min_epoch_steps)


def loader(
    dataset: Images, cfg: FitConfig, *, train: bool, generator: torch.Generator | None = None
) -> DataLoader | DeviceBatches:
    """Training: this process's slices of the global batches. Evaluation: its chunk of the split (distributed.py)."""
    if not train:
        return eval_batches(dataset, cfg.runtime.eval_batch_size, cfg.runtime.workers)
    size, rank, world = cfg.optim.batch_size, dist.rank(), dist.world()
    samples = epoch_samples(dataset, cfg)
    if isinstance(dataset, DeviceImages):
        if size < world:  # the device pipeline gives every process a slice of each batch
            raise ConfigError(f"--batch-size {size} is smaller than the {world} data-parallel processes")
        return DeviceBatches(
            dataset, size, train=True, num_samples=samples, generator=generator, rank=rank, world=world
        )
    # repeated seeded permutations when an epoch is longer than the split
    sampler = RandomSampler(dataset, num_samples=samples, generator=generator)
    batches = dist.SliceSampler(sampler, size, rank, world)
    pin = torch.cuda.is_available()
    return DataLoader(
        dist.Placeholders(dataset), batch_sampler=batches, num_workers=cfg.runtime.workers, pin_memory=pin
    )


def changed_options(run: rd.RunDir, cfg: FitConfig) -> list[str]:
    """Options, other than runtime ones, in which `cfg` differs from the config the run was made with."""
    return cfg.changed_from(run.read_config().get("fit", {}))


def check_resume(run: rd.RunDir, cfg: FitConfig) -> None:
    if not (run / rd.CONFIG).exists():  # only a search's candidates so far (a batched sweep trains them first)
        return
    differ = changed_options(run, cfg)
    if differ:
        raise RunDirError(f"--resume: options differ from the interrupted run in {run.path}: {differ}")


@dataclass
class Trainee:
    """A run being made: its directory and log, data, model, phases and the pretrained values of what trains."""

    run: rd.RunDir
    log: rd.EventLog
    data: Data
    model: Classifier
    plans: list[PhasePlan]
    names: list[str]
    norms: list[str]  # the norm modules whose gamma trains
    base: dict[str, torch.Tensor]
    meta: dict[str, Any]


def start_run(cfg: FitConfig, echo: Callable[[str], None] | None) -> tuple[rd.RunDir, rd.EventLog]:
    """Create (or reopen, with --resume) the run directory and its log; write config.yaml."""
    run = rd.RunDir(cfg.runtime.out)
    dist.from_main(partial(run.prepare, resume=cfg.runtime.resume, overwrite=cfg.runtime.overwrite))
    if cfg.runtime.resume:
        dist.from_main(partial(check_resume, run, cfg))
    if dist.is_main():
        (run / rd.FAILED).unlink(missing_ok=True)  # an earlier attempt diverged; this one is tried afresh
    log = rd.EventLog(run, echo, tensorboard=cfg.runtime.tensorboard)
    log.event("start", resume=cfg.runtime.resume)
    rd.write_yaml(run / rd.CONFIG, {"fit": cfg.to_dict(), "environment": environment(), "command": sys.argv})
    return run, log


def train_run(
    cfg: FitConfig, device: torch.device, echo: Callable[[str], None] | None, *, score_tests: bool = True
) -> rd.RunDir:
    """Train one configuration (no grid) on this process's device and write its run directory; returns it.

    Inside the process group if there is one (pipeline.fit sets it up). `score_tests=False` leaves the
    test sets unscored (a search's candidates).
    """
    run, log = start_run(cfg, echo)
    seed_everything(cfg.optim.seed)
    trainee = build(cfg, device, run, log)
    phases = train(trainee, cfg, device)
    finish(trainee, cfg, device, phases, score_tests)
    return run


def build(cfg: FitConfig, device: torch.device, run: rd.RunDir, log: rd.EventLog) -> Trainee:
    """Backbone, data (splits.json), model and phases of a run; base.safetensors holds what trains, pretrained."""
    backbone = load_configured_backbone(cfg, device, training=True)
    data = prepare_data(cfg, backbone.data_config)
    model = build_model(cfg, backbone, len(data.classes)).to(device)
    rd.write_json(run / rd.SPLITS, data.splits)
    if len(data.train) == 0:
        raise ConfigError("the training split is empty")
    sources = {id(d.source): d.source for d in data.named().values()}.values()
    pipeline = input_pipeline(cfg, data, device, backbone.data_config)
    data = load_images(data, cfg, device, backbone.data_config, pipeline)
    log.info(f"input pipeline: {pipeline}" + (" (decoded images on the device)" if pipeline == "device" else ""))
    log.info(f"fast paths: {', '.join(backbone.fast_paths) or 'none'} (--fast-paths {cfg.runtime.fast_paths})")
    if dist.is_main():
        rd.write_yaml(run / rd.CONFIG, {**run.read_config(), "resolved": resolved(backbone, pipeline)})
    for source in sources:
        if source.converted:
            modes = ", ".join(f"{n} from {m}" for m, n in sorted(source.converted.items()))
            log.info(f"note: {source.spec}: images converted to RGB ({modes})")
    for name, paths in data.splits["skipped_bad_images"].items():
        log.info(f"skipped {len(paths)} undecodable image(s) of {name}: {', '.join(paths[:10])}")
    for name, pairs in data.splits["duplicates_with_test"].items():
        shown = ", ".join(f"{a} = {b}" for a, b in pairs[:5])
        log.info(f"WARNING: {len(pairs)} test image(s) are byte-identical to {name.split('~')[0]} images: {shown}")
    log.info(
        f"{cfg.model.name} | {len(data.classes)} classes | train {len(data.train)}, val {len(data.val)}, "
        + ", ".join(f"test:{k} {len(v)}" for k, v in data.tests.items())
    )

    plans = plan_phases(model, cfg, run_length(cfg, data.train))
    names = trained_names(plans)
    if cfg.optim.frozen_dtype == "bf16":
        if not uses_bf16(device, cfg.optim.precision):
            raise ConfigError("--frozen-dtype bf16 needs bf16 autocast: --precision bf16, or auto on a GPU")
        log.info(f"frozen weights stored in bf16: {store_frozen(model, names, torch.bfloat16):,} values")
    meta = tensor_meta(model, cfg, data.classes)
    if not (run / rd.BASE).exists():
        rd.write_tensors(run / rd.BASE, snapshot(model, names), meta)
    base = dist.from_main(lambda: run.read_tensors(rd.BASE)[0])
    norms = [m for m in meta["norms"] if f"{m}.weight" in names]
    return Trainee(run, log, data, model, plans, names, norms, base, meta)


def train(t: Trainee, cfg: FitConfig, device: torch.device) -> list[dict[str, Any]]:
    """Run the phases not yet done (resuming from the checkpoint); returns each phase's record (cycles.json)."""
    model, data, names = t.model, t.data, t.names
    done_phases: list[dict] = []
    resume_state: PhaseState | None = None

    def save_checkpoint(state: PhaseState | None) -> None:
        save_resume_state(t.run, snapshot(model, names), done_phases, state)

    ckpt = dist.from_main(lambda: load_resume_state(t.run) if cfg.runtime.resume else None)  # rank 0 reads, all restore
    if ckpt is not None:
        tensors, done_phases, resume_state = ckpt
        restore(model, tensors)
        t.log.info(f"resuming after phase {len(done_phases)} epoch {resume_state.epoch if resume_state else 0}")

    validate = partial(
        evaluate, model, loader(data.val, cfg, train=False), len(data.classes), device, cfg.optim.precision
    )
    for plan in t.plans[len(done_phases) :]:
        state = run_phase(
            model,
            plan,
            cfg,
            lambda g: loader(data.train, cfg, train=True, generator=g),
            validate,
            device,
            t.log,
            save_checkpoint,
            resume_state,
        )
        resume_state = None
        record = {"phase": plan.phase.name, "strategy": plan.phase.strategy, "steps": plan.steps}
        record.update(best_epoch=state.best_epoch, history=state.history)
        if t.norms:
            record.update(totals(layer_shift(t.base, snapshot(model, names), t.norms)))
        if plan.phase.rescale_after and cfg.method.lam is not None:
            record["lambda"] = apply_lambda(model, cfg, t.norms, t.base, names, data, device)
            record["val_after_lambda"] = validate()["accuracy"]
        done_phases.append(record)
        save_checkpoint(None)
    return done_phases


def save_resume_state(
    run: rd.RunDir, tensors: dict[str, torch.Tensor], done_phases: list[dict], state: PhaseState | None
) -> None:
    """The checkpoint as one safetensors file with JSON metadata: atomic, and loading it runs no pickled code."""
    packed, record = state.pack() if state is not None else ({}, None)
    model = {f"model/{n}": t for n, t in tensors.items()}
    rd.write_tensors(run / rd.CHECKPOINT_STATE, {**model, **packed}, {"done_phases": done_phases, "state": record})


def load_resume_state(run: rd.RunDir) -> tuple[dict[str, torch.Tensor], list[dict], PhaseState | None] | None:
    """The trained tensors, finished phases' records and the unfinished phase's state; None with no checkpoint."""
    if not (run / rd.CHECKPOINT_STATE).exists():
        return None
    tensors, meta = run.read_tensors(rd.CHECKPOINT_STATE)
    model = {n.removeprefix("model/"): t for n, t in tensors.items() if n.startswith("model/")}
    rest = {n: t for n, t in tensors.items() if not n.startswith("model/")}
    state = None if meta["state"] is None else PhaseState.unpack(rest, meta["state"])
    return model, meta["done_phases"], state


def finish(t: Trainee, cfg: FitConfig, device: torch.device, phases: list[dict[str, Any]], score_tests: bool) -> None:
    """After training: the run's outcome (and DONE, unless a final lambda is still to come)."""
    data = t.data if score_tests else replace(t.data, tests={})
    write_outcome(t.run, t.model, t.names, t.norms, t.base, t.meta, data, cfg, device, t.log, phases)


def tensor_meta(model: Classifier, cfg: FitConfig, classes: list[str]) -> dict[str, Any]:
    """What base/adapter.safetensors carry beside the tensors: norms, classes, method, preprocessing."""
    norms = norm_module_names(model, cfg.method.strategy)
    return {"norms": norms, "classes": classes, "method": cfg.method.name, "data_config": model.backbone.data_config}


def write_outcome(
    run: rd.RunDir,
    model: nn.Module,
    names: list[str],
    norms: list[str],
    base: dict[str, torch.Tensor],
    meta: dict[str, Any],
    data: Data,
    cfg: FitConfig,
    device: torch.device,
    log: rd.EventLog,
    phases: list[dict[str, Any]],
) -> None:
    """A trained model's adapter, shift and phase history; then its metrics and DONE.

    With a final lambda (`cfg.method.final_lambda`) the run stays open after the phase history, checkpoint
    included: the rescaled model is what gets scored, and an interrupted rescale resumes from here.
    """
    adapter = snapshot(model, names)
    rd.write_tensors(run / rd.ADAPTER, adapter, meta)
    if norms:
        rd.write_json(run / rd.SHIFT, layer_shift(base, adapter, norms).to_dict())
    rd.write_json(run / rd.CYCLES, {"phases": phases, "budget": budget_record(cfg, phases)})
    if cfg.method.final_lambda:
        return
    metrics = evaluate_all(model, data.val, data.tests, len(data.classes), cfg, device)
    rd.write_json(run / rd.METRICS, metrics)
    log.info("metrics: " + summarize(metrics))
    close_run(run, log)


def close_run(run: rd.RunDir, log: rd.EventLog) -> None:
    """The last step of every run: the 'done' event, then DONE (which drops the resume state)."""
    log.event("done")
    run.mark_done()


def budget_record(cfg: FitConfig, phases: list[dict[str, Any]]) -> dict[str, Any]:
    """cycles.json's budget: the --steps / --epochs budget in steps, how the method spent it, the steps trained."""
    steps = sum(p["steps"] for p in phases)
    factor = budget_factor(cfg.method.name, cfg.method.cycles)
    return {"rule": budget_rule(cfg.method.name), "budget_steps": steps // factor, "factor": factor, "steps": steps}


def apply_lambda(
    model: nn.Module, cfg: FitConfig, norms: list[str], base: dict, names: list[str], data: Data, device: torch.device
) -> float:
    """Choose lambda between cycles (a number, or on validation), rescale the LayerNorms in place; returns it."""
    tuned = snapshot(model, names)
    curve = select_lambda(
        model,
        norms,
        base,
        tuned,
        data.val,
        len(data.classes),
        device,
        grid=parse_grid(cfg.method.lambda_grid),
        target=cfg.method.lambda_target,
        batch_size=cfg.runtime.eval_batch_size,
        precision=cfg.optim.precision,
    )
    lam = lambda_record(curve, cfg.method.lam, rd.RunDir(cfg.runtime.out))[
        "lambda"
    ]  # no 'fsr' between cycles: nothing is read
    restore(model, rescale(base, tuned, norms, lam, cfg.method.lambda_target))
    return lam


def evaluate_all(
    model: nn.Module,
    val: Images,
    tests: dict[str, Images],
    num_classes: int,
    cfg: FitConfig,
    device: torch.device,
) -> dict[str, Any]:
    """metrics.json content: the validation split and every named test set."""
    ev = partial(
        evaluate, num_classes=num_classes, device=device, precision=cfg.optim.precision, progress=cfg.runtime.progress
    )
    return {
        "val": ev(model, loader(val, cfg, train=False), desc="val"),
        "test": {k: ev(model, loader(ds, cfg, train=False), desc=f"test:{k}") for k, ds in tests.items()},
    }


def totals(shift: ShiftReport) -> dict[str, float]:
    return {"shift_gamma": shift.shift_gamma, "shift_beta": shift.shift_beta, "shift_ln": shift.shift_ln}


def summarize(metrics: dict[str, Any]) -> str:
    parts = [f"val acc {metrics['val']['accuracy']:.4f}"]
    parts += [f"{k} acc {v['accuracy']:.4f}" for k, v in metrics.get("test", {}).items()]
    return ", ".join(parts)
