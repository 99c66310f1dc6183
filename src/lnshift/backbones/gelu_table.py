"""The exact GELU of bf16 activations by table lookup: correctly rounded, and on a GPU near memory speed.

Why: in LayerNorm tuning of a ViT nearly all weights are frozen, so after the matrix products the
step's largest cost was the MLP's GELU and its backward, evaluated with erf and exp on every element
of the widest activation (limited by that arithmetic, not by memory; benchmarks/results/README.md).
A bf16 input has only 65,536 values. Outside 2**-9 <= |x| < 16 (2**-26 <= |x| < 16 for
the slope) GELU and its slope follow fixed rules (x / 2 and 1/2 below; x or -0 and 1 or 0 above),
and the 3,328 (7,680) values in between are computed once in float64 and rounded once: to bf16 for
GELU, so it is correctly rounded (torch's float32 GELU differs on 200 inputs), and to float32 for
the slope, which multiplies the incoming gradient in float32 as torch's gelu_backward does.

`TableGELU` stands in for `nn.GELU()` (approximate="none"): bf16 inputs go through the custom op
`lnshift::gelu_bf16` (Triton kernels on CUDA, `gelu_kernel`; a torch lookup elsewhere or without
Triton), other dtypes through F.gelu. `use_table_gelu(model)` swaps it in (the fast path `table_gelu`,
backbones/fastpath.py: on the CPU the lookup is ~10x slower than F.gelu in bf16).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Layout(NamedTuple):
    """Which bf16 inputs a table holds: magnitudes with bits lo..hi-1 from entry 0, their negatives
    from entry `half` (2 * half entries in all: Triton's blocks need a power of two)."""

    lo: int
    hi: int
    half: int

    @property
    def size(self) -> int:
        return 2 * self.half


# The narrowest ranges outside of which the rules hold for every bf16 input (tests/test_gelu_table.py)
GELU_LAYOUT = Layout(lo=118 << 7, hi=131 << 7, half=2048)  # 2**-9 <= |x| < 16, bf16 values
SLOPE_LAYOUT = Layout(lo=101 << 7, hi=131 << 7, half=4096)  # 2**-26 <= |x| < 16, float32 values


def _table_inputs(layout: Layout) -> Tensor:
    """float64 values of the table's inputs (0 in the unused entries)."""
    mags = torch.arange(layout.lo, layout.hi, dtype=torch.int16).view(torch.bfloat16).double()
    x = torch.zeros(layout.size, dtype=torch.float64)
    x[: len(mags)], x[layout.half : layout.half + len(mags)] = mags, -mags
    return x


def gelu64(x: Tensor) -> Tensor:
    """x * Phi(x) in float64, through erfc so that negative x keep their precision."""
    return x * 0.5 * torch.special.erfc(-x / math.sqrt(2))


def slope64(x: Tensor) -> Tensor:
    """GELU'(x) = Phi(x) + x * phi(x) in float64."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def round_bf16(v: Tensor) -> Tensor:
    """float64 -> bfloat16 in one rounding, to nearest, ties to even (a cast through float32 rounds twice)."""
    _, exponent = torch.frexp(v)  # |v| = m * 2**exponent, 0.5 <= m < 1
    ulp = torch.ldexp(torch.ones_like(v), (exponent - 8).clamp(min=-133))  # 8 significant bits; subnormals
    return (torch.round(v / ulp) * ulp).float().bfloat16()


@functools.cache
def tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """(GELU as bf16 in GELU_LAYOUT, GELU' as float32 in SLOPE_LAYOUT) on `device`."""
    gelu = round_bf16(gelu64(_table_inputs(GELU_LAYOUT)))
    slope = slope64(_table_inputs(SLOPE_LAYOUT)).float()
    return gelu.to(device), slope.to(device)


def _lookup(x: Tensor, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """(table index, |x|'s bits, sign) of bf16 x, as the kernels compute them."""
    bits = x.view(torch.int16).int() & 0xFFFF
    mag = bits & 0x7FFF
    k = (mag - layout.lo).clamp(0, layout.hi - layout.lo - 1)
    negative = bits >= 0x8000
    return torch.where(negative, k + layout.half, k), mag, negative


def gelu_lookup(x: Tensor) -> Tensor:
    """The table GELU of bf16 x in torch operations (what the forward kernel computes)."""
    idx, mag, negative = _lookup(x, GELU_LAYOUT)
    xf = x.float()
    y = tables(x.device)[0][idx]
    y = torch.where(mag < GELU_LAYOUT.lo, (xf * 0.5).bfloat16(), y)  # x / 2, rounded
    return torch.where(mag >= GELU_LAYOUT.hi, torch.where(negative, (xf * 0.0).bfloat16(), x), y)


def slope_lookup(x: Tensor) -> Tensor:
    """GELU'(x) as float32 for bf16 x in torch operations (what the backward kernel multiplies by)."""
    idx, mag, negative = _lookup(x, SLOPE_LAYOUT)
    slope = tables(x.device)[1][idx]
    slope = torch.where(mag < SLOPE_LAYOUT.lo, 0.5, slope)
    slope = torch.where(mag >= SLOPE_LAYOUT.hi, torch.where(negative, 0.0, 1.0), slope)
    return torch.where(mag >= 0x7F80, math.nan, slope)  # inf and NaN: NaN, as torch


@functools.cache
def triton_kernels() -> ModuleType | None:
    """The Triton kernels, or None where Triton is missing (torch's CUDA wheels for Linux bring it)."""
    try:
        from . import gelu_kernel
    except ImportError:
        return None
    return gelu_kernel


@torch.library.custom_op("lnshift::gelu_bf16", mutates_args=())
def gelu_bf16(x: Tensor) -> Tensor:
    """Exact GELU of a bf16 tensor, correctly rounded (contiguous result)."""
    x = x.contiguous()
    kernels = triton_kernels() if x.is_cuda else None
    return kernels.gelu_forward(x, tables(x.device)[0], GELU_LAYOUT) if kernels else gelu_lookup(x)


@torch.library.custom_op("lnshift::gelu_bf16_backward", mutates_args=())
def gelu_bf16_backward(dy: Tensor, x: Tensor) -> Tensor:
    """dy * GELU'(x) for bf16 dy and x, the product taken in float32 and rounded once (contiguous result)."""
    dy, x = dy.contiguous(), x.contiguous()
    kernels = triton_kernels() if x.is_cuda else None
    if kernels:
        return kernels.gelu_backward(dy, x, tables(x.device)[1], SLOPE_LAYOUT)
    return (dy.float() * slope_lookup(x)).bfloat16()


@gelu_bf16.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@gelu_bf16_backward.register_fake
def _(dy: Tensor, x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return gelu_bf16_backward(dy, x)


gelu_bf16.register_autograd(_backward, setup_context=_setup)


class TableGELU(nn.Module):
    """`nn.GELU()` whose bf16 inputs go through the tables; other dtypes through F.gelu."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu_bf16(x) if x.dtype == torch.bfloat16 else F.gelu(x)


def is_exact_gelu(module: nn.Module) -> bool:
    """An erf GELU module of torch (timm's and open_clip's ViTs), timm or transformers (HF ViTs)."""
    if type(module) is nn.GELU:
        return module.approximate == "none"
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if kind == "timm.layers.activations.GELU":
        return True
    return kind == "transformers.activations.GELUActivation" and getattr(module, "act", None) is F.gelu


def use_table_gelu(model: nn.Module) -> int:
    """Replace every exact GELU module in `model` by TableGELU; returns how many were replaced."""
    swaps = [
        (parent, name) for parent in model.modules() for name, child in parent.named_children() if is_exact_gelu(child)
    ]
    for parent, name in swaps:
        setattr(parent, name, TableGELU())
    return len(swaps)
