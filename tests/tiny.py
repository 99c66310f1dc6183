"""Shared by the tests: options for timm's tiny random test ViT at 32 px (no workers, no bars), small
image folders of real PNGs, a comparison of a loaded backbone's outputs with its source model's, and the
distance between two runs."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_MODEL = ["--model", "lnshift/test-vit", "--model-kwargs", "{img_size: 32, patch_size: 8}"]
TINY = [*TINY_MODEL, "--min-epoch-steps", "1", "--workers", "0", "--progress", "false"]


def image_folder(root: Path, per_class: int, classes: tuple[str, ...] = ("cat", "dog"), seed: int = 0) -> Path:
    """An ImageFolder at `root`: `per_class` random 24 px PNGs in a subfolder per class."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{cls}{i}.png")
    return root


def same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to summation order (what the fast paths of backbones/fastpath.py change, where they
    are on). Weights loaded wrongly differ by orders of magnitude more."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two state dicts with the same keys."""
    return max((a[k] - b[k]).abs().max().item() for k in a)
