"""A run's ingredients, built from its config: its data (seeded splits, datasets, decoded images), backbone,
model, phases, length and loaders.

fit.py makes a run of them; batched runs (multirun.py) and the analyses of saved runs (saved_run.py) build
theirs from the same functions, so every path reads a config the same way.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ..backbones import Backbone, load_backbone, resolve_fast_paths
from ..config import DEVICE_DATA_SHARE, DEVICE_DATA_SHARE_ENV, VAL_SIZES, FitConfig
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
from ..errors import ConfigError, DataError
from ..strategies import get_strategy
from . import distributed as dist
from .heads import Classifier, build_head
from .loop import PhasePlan
from .phases import phase_steps, phases_for

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
