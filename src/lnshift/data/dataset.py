"""The torch Dataset over an ImageSource, class-set checks, and timm preprocessing transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args

import torch
from PIL import Image
from timm.data import create_transform

from lnshift.config.sections import Augment
from lnshift.data.sources import ImageSource
from lnshift.errors import ConfigError, DataError

AUGMENTS: tuple[str, ...] = get_args(Augment)  # the choices of --augment
# timm's RandomResizedCrop default (0.08, 1) keeps as little as a 9x9 patch of a 32x32 CIFAR
# image, which is mostly upsampling blur once resized to 224; a quarter of the image at least
# keeps the object recognisable for small sources and is still a real crop for large ones.
TRAIN_SCALE = (0.25, 1.0)
STRONG_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
STRONG_RE_PROB = 0.25


class ImageDataset(torch.utils.data.Dataset):
    """(transform(image), class index) for the images of `source` at `indices`.

    With `cache=True` decoded images are kept after their first load. A DataLoader worker's
    cache dies with the worker, so call `preload()` before the workers fork to share one copy.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int],
        class_to_idx: dict[str, int],
        transform: Callable[[Image.Image], Any] | None,
        cache: bool = False,
    ) -> None:
        self.source = source
        self.indices = [int(i) for i in indices]
        unknown = sorted({source.samples[i].label for i in self.indices} - class_to_idx.keys())
        if unknown:
            raise DataError(f"source {source.spec!r} has images of unknown class(es) {unknown}")
        self.targets = [class_to_idx[source.samples[i].label] for i in self.indices]
        self.transform = transform
        self.cache = cache
        self._images: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[Any, int]:
        image = self._images.get(k)
        if image is None:
            image = self.source.load(self.indices[k])
            if self.cache:
                self._images[k] = image
        return (self.transform(image) if self.transform else image), self.targets[k]

    def preload(self) -> None:
        """Decode every image into the cache now (and keep caching from here on)."""
        self.cache = True
        for k in range(len(self)):
            if k not in self._images:
                self._images[k] = self.source.load(self.indices[k])


def check_classes(reference: list[str], source: ImageSource, split_name: str) -> None:
    """DataError unless `source` has exactly the reference classes, naming the differences."""
    missing = sorted(set(reference) - set(source.classes))
    extra = sorted(set(source.classes) - set(reference))
    if missing or extra:
        raise DataError(
            f"{split_name} source {source.spec!r} does not have the training classes: missing {missing}, extra {extra}"
        )


def make_transform(data_config: dict, *, train: bool, augment: str = "default") -> Callable:
    """timm preprocessing for a model's `data_config` (input_size, mean, std, interpolation, crop_pct).

    augment (train only): "default" is RandomResizedCrop + horizontal flip; "none" is the eval
    transform; "strong" adds RandAugment and random erasing. Color jitter is off: it would
    perturb the colour statistics that LayerNorm tuning adapts to.
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    common = {
        "input_size": data_config["input_size"],
        "mean": data_config["mean"],
        "std": data_config["std"],
        "interpolation": data_config["interpolation"],
    }
    if not train or augment == "none":
        return create_transform(**common, crop_pct=data_config["crop_pct"], crop_mode=data_config.get("crop_mode"))
    strong = augment == "strong"
    return create_transform(
        **common,
        is_training=True,
        scale=TRAIN_SCALE,
        color_jitter=None,
        auto_augment=STRONG_AUTO_AUGMENT if strong else None,
        re_prob=STRONG_RE_PROB if strong else 0.0,
        re_mode="pixel",
    )
