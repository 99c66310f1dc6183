"""Frozen linear layers and ViT MLPs through QuACK's Hopper GEMMs, where QuACK is installed.

Why: in LayerNorm tuning every linear layer is frozen, so its backward is one product, the input
gradient, and matrix products are half of a step's time. QuACK (Tri Dao's CuTe DSL kernels,
`pip install lnshift[hopper]`) runs them with warp-specialised TMA kernels that were faster than
cuBLAS on a ViT-B/16 step's shapes on an H200 (768 -> 768 by 7 %, 768 -> 3072 by 9 %) with equal
results (`benchmarks/results/README.md`).

`use_hopper_gemm(model)` swaps the class of plain `nn.Linear` modules in place (parameters and
state-dict keys unchanged), as `patch_matmul` does for patch convs. The QuACK path is taken per
call, only where it computes the same thing: CUDA on a GPU QuACK has kernels for (compute
capability 9.0 or later), bf16 / fp16 activations (autocast included), weight and bias that need no
gradient. Otherwise, and wherever QuACK is missing, the layer is torch's own. timm `Mlp` modules
are swapped to HopperMlp, whose frozen exact-GELU form takes the GELU into fc1's product and GELU'
into the backward's first product (QuACK epilogues in `_quack_ops`): GELU applied to the float32
pre-activation instead of to it rounded to bf16, so results differ from the unfused path's by bf16
roundings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .gelu_table import TableGELU, is_exact_gelu

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


@functools.cache
def _epilogues() -> Any:
    from . import _quack_ops

    return _quack_ops


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


# --- frozen GELU MLP: y = fc2(GELU(fc1(x))), backward dX = ((dY W2) * GELU'(A)) W1 --------------


def _gelu_slope(a: Tensor) -> Tensor:
    """d/da of the erf GELU."""
    return 0.5 * (1 + torch.erf(a * math.sqrt(0.5))) + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)


@torch.library.custom_op("lnshift::frozen_gelu_mlp", mutates_args=())
def frozen_gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(fc2(GELU(fc1(x))), A = fc1(x)) for 2-D x, GELU applied to fc1's float32 result; A is kept for the backward."""
    if x.is_cuda:
        a, h = _epilogues().gemm_gelu(x, w1, b1)
        return _gemm()(h, w2.t(), bias=b2), a
    wide = torch.promote_types(x.dtype, torch.float32)  # the accumulator's precision, float64 kept
    a = torch.addmm(b1.to(wide), x.to(wide), w1.to(wide).t())
    return F.linear(F.gelu(a).to(x.dtype), w2, b2), a.to(x.dtype)


@frozen_gelu_mlp.register_fake
def _(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("lnshift::frozen_gelu_mlp_backward", mutates_args=())
def frozen_gelu_mlp_backward(dy: Tensor, a: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """dX of `frozen_gelu_mlp` given dY: ((dY W2) * GELU'(A)) W1, the slope applied before rounding."""
    if dy.is_cuda:
        return _gemm()(_epilogues().gemm_dgelu(dy, w2, a), w1)
    wide = torch.promote_types(dy.dtype, torch.float32)
    da = (dy.to(wide) @ w2.to(wide)) * _gelu_slope(a.to(wide))
    return da.to(dy.dtype) @ w1


@frozen_gelu_mlp_backward.register_fake
def _(dy: Tensor, a: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    return dy.new_empty(dy.shape[0], w1.shape[1])


def _mlp_setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    _, w1, _, w2, _ = inputs
    ctx.save_for_backward(output[1], w1, w2)


def _mlp_backward(ctx: Any, dy: Tensor, _da: Tensor) -> tuple[Tensor | None, ...]:
    a, w1, w2 = ctx.saved_tensors
    return frozen_gelu_mlp_backward(dy.contiguous(), a, w1, w2), None, None, None, None


frozen_gelu_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup)


@register_flop_formula(torch.ops.lnshift.frozen_gelu_mlp)
def _mlp_flops(x_shape: tuple[int, ...], w1_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> int:
    """fc1 and fc2: two products of x's M rows by H x C weights (the GELU is not counted, as torch does not)."""
    return 4 * x_shape[0] * math.prod(w1_shape)


@register_flop_formula(torch.ops.lnshift.frozen_gelu_mlp_backward)
def _mlp_backward_flops(
    dy_shape: tuple[int, ...], a_shape: tuple[int, ...], w1_shape: tuple[int, ...], *args: Any, **kwargs: Any
) -> int:
    """The input gradient's two products, as many FLOPs as the forward's."""
    return 4 * dy_shape[0] * math.prod(w1_shape)


def fusable(mlp: nn.Module) -> bool:
    """A timm Mlp that `frozen_gelu_mlp` computes exactly in structure: exact GELU, both biases, no norm or dropout."""
    return (
        isinstance(mlp, Mlp)
        and is_plain_linear(mlp.fc1)
        and is_plain_linear(mlp.fc2)
        and (isinstance(mlp.act, TableGELU) or is_exact_gelu(mlp.act))
        and isinstance(mlp.norm, nn.Identity)
        and mlp.fc1.bias is not None
        and mlp.fc2.bias is not None
        and not (mlp.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0))
    )


class HopperMlp(Mlp):
    """timm's Mlp whose frozen exact-GELU form runs as two QuACK products with the GELU in their epilogues."""

    def forward(self, x: Tensor) -> Tensor:
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if not fusable(self) or any(_fast(x, w, b) is None for w, b in (params[:2], params[2:])):
            return super().forward(x)
        dtype = _fast(x, *params[:2])
        cast = [t.to(dtype) for t in (x, *params)]
        flat = cast[0].reshape(-1, x.shape[-1]).contiguous()
        return frozen_gelu_mlp(flat, *cast[1:])[0].view(*x.shape[:-1], -1)


def use_hopper_gemm(model: nn.Module) -> int:
    """Swap plain nn.Linear and timm Mlp modules of `model` to their QuACK forms; returns how many were swapped."""
    global _AVAILABLE
    _AVAILABLE = _gemm() is not None
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = HopperLinear
        elif type(module) is Mlp:
            module.__class__ = HopperMlp
        else:
            continue
        swapped += 1
    return swapped
