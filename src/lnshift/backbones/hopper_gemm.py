"""Frozen linear layers through QuACK's Hopper GEMMs, where QuACK is installed.

Why: in LayerNorm tuning every linear layer is frozen, so its backward is one product, the input
gradient, and matrix products are half of a step's time. QuACK (Tri Dao's CuTe DSL kernels,
`pip install lnshift[hopper]`) runs them with warp-specialised TMA kernels that were faster than
cuBLAS on a ViT-B/16 step's shapes on an H200 (768 -> 768 by 7 %, 768 -> 3072 by 9 %) with equal
results (`benchmarks/results/README.md`).

`use_hopper_gemm(model)` swaps the class of plain `nn.Linear` modules in place (parameters and
state-dict keys unchanged), as `patch_matmul` does for patch convs. The QuACK path is taken per
call, only where it computes the same thing: CUDA on a GPU QuACK has kernels for (compute
capability 9.0 or later), bf16 / fp16 activations (autocast included), weight and bias that need no
gradient. Otherwise, and wherever QuACK is missing, the layer is torch's own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

HALF = (torch.bfloat16, torch.float16)
_AVAILABLE = False  # set by use_hopper_gemm, outside any compiled region (torch.compile would trace _gemm)


@functools.cache
def _gemm() -> Callable[..., Tensor] | None:
    """QuACK's `gemm(a, b, bias=...)`, or None where QuACK (or a GPU it has kernels for) is missing."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return None
    try:
        from quack.gemm_interface import gemm
    except ImportError:
        return None
    return functools.partial(gemm, tuned=False)  # QuACK's default kernel per shape; tuning costs seconds each


def _fast(x: Tensor, w: Tensor, b: Tensor | None) -> torch.dtype | None:
    """The half dtype to run the QuACK path in, or None when it does not apply to this call."""
    if not (x.is_cuda and _AVAILABLE) or w.requires_grad or (b is not None and b.requires_grad):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in HALF else None


@torch.library.custom_op("lnshift::frozen_linear", mutates_args=())
def frozen_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x @ w.T + b for 2-D x (QuACK on CUDA, F.linear elsewhere)."""
    if x.is_cuda:
        return _gemm()(x, w.t(), bias=b)
    return F.linear(x, w, b)


@frozen_linear.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("lnshift::frozen_linear_backward", mutates_args=())
def frozen_linear_backward(dy: Tensor, w: Tensor) -> Tensor:
    """dX = dY @ w of `frozen_linear`."""
    if dy.is_cuda:
        return _gemm()(dy, w)
    return dy @ w


@frozen_linear_backward.register_fake
def _(dy: Tensor, w: Tensor) -> Tensor:
    return dy.new_empty(dy.shape[0], w.shape[1])


def _linear_setup(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[1])


def _linear_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    (w,) = ctx.saved_tensors
    return frozen_linear_backward(dy.contiguous(), w), None, None


frozen_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


@register_flop_formula([torch.ops.lnshift.frozen_linear, torch.ops.lnshift.frozen_linear_backward])
def _linear_flops(x_shape: tuple[int, ...], w_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> int:
    """torch's FlopCounterMode counts the custom ops as the products they are (x: (M, K), w: K x N either way)."""
    return 2 * math.prod(x_shape) * math.prod(w_shape) // x_shape[-1]


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, w, b), through QuACK when the weights are frozen and x is (autocast to) bf16 / fp16 on a GPU."""
    dtype = _fast(x, w, b)
    if dtype is None:
        return F.linear(x, w, b)
    bias = None if b is None else b.to(dtype)
    flat = x.to(dtype).reshape(-1, x.shape[-1]).contiguous()
    return frozen_linear(flat, w.to(dtype), bias).view(*x.shape[:-1], w.shape[0])


class HopperLinear(nn.Linear):
    """nn.Linear whose frozen products run through QuACK (`linear`); same parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear as torch builds it or as HopperLinear (not a subclass with its own forward, nor a LoRA wrap)."""
    return type(module) in (nn.Linear, HopperLinear)


def use_hopper_gemm(model: nn.Module) -> int:
    """Swap the plain nn.Linear modules of `model` to HopperLinear; returns how many were swapped."""
    global _AVAILABLE
    _AVAILABLE = _gemm() is not None
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = HopperLinear
            swapped += 1
    return swapped
