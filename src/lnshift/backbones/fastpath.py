"""Fast paths: exact rewrites of a loaded backbone that pay on CUDA GPUs, behind one switch.

As timm keeps its fused-attention switch in `timm.layers.config`, lnshift keeps these here, named in
`config.FAST_PATHS` and chosen by `--fast-paths` (`FitConfig.runtime.fast_paths`):
- `patch_matmul`: the patch-embedding conv as one matrix product (patch_matmul.py);
- `table_gelu`: the exact GELU of bf16 activations by table lookup, Triton kernels on CUDA (gelu_table.py);
- `class_token`: timm ViTs with class-token pooling compute q, k and v as three products and the last
  block's tail on the class token only (timm_backbone.py); at every call it gives way to timm's forward
  where a hook sits on a module it skips or the pooling has changed.

Each changes results by float rounding only (summation order; the table GELU is correctly rounded,
torch's float32 GELU is one unit off on ~200 bf16 inputs), and each made LayerNorm tuning faster on
an H200 (benchmarks/results/README.md). On the CPU they gain nothing and the table GELU is ~10x
slower than F.gelu in bf16, so `auto` turns them on to train on CUDA only: evaluation, merge,
inspect and CPU runs keep the library's own forward, as does `load_backbone` unless asked.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import FAST_PATHS, parse_fast_paths
from ..errors import ConfigError
from .base import Backbone
from .gelu_table import triton_kernels, use_table_gelu
from .patch_matmul import use_patch_matmul
from .timm_backbone import TimmBackbone, reads_class_token


def resolve_fast_paths(setting: str, device: torch.device, training: bool) -> tuple[str, ...]:
    """The fast paths a --fast-paths setting turns on for a model on `device`.

    `auto`: every one to train on CUDA (the table GELU only where Triton is, else its torch lookup
    would be slower than F.gelu), none otherwise. Other settings name them (off, all, a list).
    """
    named = parse_fast_paths(setting)
    if named is not None:
        return named
    if not training or device.type != "cuda":
        return ()
    return tuple(name for name in FAST_PATHS if name != "table_gelu" or triton_kernels() is not None)


def apply_fast_paths(backbone: Backbone, names: Iterable[str]) -> list[str]:
    """Turn on the fast paths `names` in a loaded backbone; those that its architecture has (a patch
    conv, exact GELUs, class-token pooling) are added to `backbone.fast_paths`, which is returned."""
    names = set(names)
    unknown = sorted(names - set(FAST_PATHS))
    if unknown:
        raise ConfigError(f"unknown fast paths {unknown}; known: {list(FAST_PATHS)}")
    applied = set(backbone.fast_paths)
    if "patch_matmul" in names and use_patch_matmul(backbone.model, backbone.patch_convs):
        applied.add("patch_matmul")
    if "table_gelu" in names and use_table_gelu(backbone):
        applied.add("table_gelu")
    if "class_token" in names and isinstance(backbone, TimmBackbone) and reads_class_token(backbone.model):
        backbone.class_token_only = True
        applied.add("class_token")
    backbone.fast_paths = [name for name in FAST_PATHS if name in applied]
    return backbone.fast_paths
