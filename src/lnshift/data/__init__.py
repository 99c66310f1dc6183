"""Image sources, deterministic splits, and the torch Dataset and transforms built on them."""

from lnshift.data.dataset import AUGMENTS, ImageDataset, check_classes, make_transform
from lnshift.data.sources import IMAGE_EXTENSIONS, ImageSource, Sample, open_source
from lnshift.data.splits import (
    Split,
    check_disjoint,
    find_duplicate_content,
    holdout,
    matched,
    splits_to_dict,
    subsample,
)

__all__ = [
    "AUGMENTS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageSource",
    "Sample",
    "Split",
    "check_classes",
    "check_disjoint",
    "find_duplicate_content",
    "holdout",
    "make_transform",
    "matched",
    "open_source",
    "splits_to_dict",
    "subsample",
]
