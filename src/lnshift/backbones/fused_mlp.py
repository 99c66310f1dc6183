"""A ViT MLP with frozen weights, its GELU fused into cuBLASLt's matrix products (opt-in).

Why: in LayerNorm tuning the MLP's weights are frozen, so its backward is only the input gradient
dX = ((dY W2) * GELU'(A)) W1. Unfused, fc1's output A goes to memory, the GELU kernel reads it and
writes GELU(A) for fc2, and the backward writes dY W2 for another kernel to multiply by GELU'(A).
cuBLASLt applies GELU inside fc1's product (epilogue GELU_AUX_BIAS, which also keeps A for the
backward) and GELU' inside the backward's first product (DGELU). On an H200 that saved 0.18 ms per
ViT-B MLP and 0.17 ms per ViT-L one, forward + backward at batch 256
(`benchmarks/results/cublaslt_gelu_probe_h200.log`), through nvmath-python's cuBLASLt bindings.

Numerics, and why it is opt-in: cuBLASLt's GELU is the tanh approximation (at most 4.7e-4 from the
erf GELU, under 6 % of a bf16 ulp where it is largest), applied to the float32 accumulator instead
of to A rounded to bf16; its backward multiplies the float32 dY W2 by GELU' before rounding once. So
results differ from the table GELU's (`gelu_table`) by bf16 roundings: on random data 30 % of the
GELU outputs by one ulp. Off CUDA (and for tests) the same arithmetic runs in torch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gelu_table import TableGELU, is_exact_gelu


@functools.cache
def _nvmath() -> Any:
    """nvmath.linalg.advanced, or None where nvmath-python is missing."""
    try:
        from nvmath.linalg import advanced
    except ImportError:
        return None
    return advanced


def available() -> bool:
    """Whether CUDA tensors can take the cuBLASLt path (nvmath-python importable)."""
    return _nvmath() is not None


_plans: dict[tuple, Any] = {}


def _matmul(epilog: str, a: Tensor, b: Tensor, **inputs: Tensor) -> Any:
    """a @ b with cuBLASLt's `epilog` on the current stream; plans are kept per shape and layout."""
    advanced = _nvmath()
    key = (epilog, a.shape, a.stride(), b.shape, b.stride(), a.dtype, a.device)
    stream = torch.cuda.current_stream(a.device)
    plan = _plans.get(key)
    if plan is None:
        plan = advanced.Matmul(a, b, stream=stream)
        plan.plan(epilog=getattr(advanced.MatmulEpilog, epilog), epilog_inputs=inputs, stream=stream)
        plan.autotune(iterations=5, stream=stream)  # cuBLASLt's first heuristic pick was not its fastest
        _plans[key] = plan
    else:
        plan.reset_operands_unchecked(a=a, b=b, epilog_inputs=inputs, stream=stream)
    return plan.execute(stream=stream)


def _gelu_slope(a: Tensor) -> Tensor:
    """d/da of the tanh GELU."""
    k = 0.7978845608028654  # sqrt(2 / pi)
    inner = k * (a + 0.044715 * a**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * 0.044715 * a * a)


@torch.library.custom_op("lnshift::frozen_gelu_mlp", mutates_args=())
def frozen_gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(fc2(GELU(fc1(x))), A = fc1(x)) for 2-D x, with cuBLASLt's tanh GELU; A is kept for the backward."""
    if x.is_cuda and available():
        h_t, aux = _matmul("GELU_AUX_BIAS", w1, x.t(), bias=b1)  # (hidden, M): bias per row
        return F.linear(h_t.t(), w2, b2), aux["gelu_aux"]
    wide = torch.promote_types(x.dtype, torch.float32)  # the accumulator's precision, float64 kept
    a = torch.addmm(b1.to(wide), x.to(wide), w1.to(wide).t())
    h = F.gelu(a, approximate="tanh").to(x.dtype)
    return F.linear(h, w2, b2), a.to(x.dtype).t()


@frozen_gelu_mlp.register_fake
def _(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0]).t()


@torch.library.custom_op("lnshift::frozen_gelu_mlp_backward", mutates_args=())
def frozen_gelu_mlp_backward(dy: Tensor, aux: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """dX of `frozen_gelu_mlp` given dY: ((dY W2) * GELU'(A)) W1, the slope applied before rounding."""
    if dy.is_cuda and available():
        da_t = _matmul("DGELU", w2.t(), dy.t(), gelu_aux=aux)  # (hidden, M)
        return da_t.t() @ w1
    wide = torch.promote_types(dy.dtype, torch.float32)
    da = (dy.to(wide) @ w2.to(wide)) * _gelu_slope(aux.t().to(wide))
    return da.to(dy.dtype) @ w1


@frozen_gelu_mlp_backward.register_fake
def _(dy: Tensor, aux: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    return dy.new_empty(dy.shape[0], w1.shape[1])


def _setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    _, w1, _, w2, _ = inputs
    ctx.save_for_backward(output[1], w1, w2)


def _backward(ctx: Any, dy: Tensor, _daux: Tensor) -> tuple[Tensor | None, ...]:
    aux, w1, w2 = ctx.saved_tensors
    return frozen_gelu_mlp_backward(dy.contiguous(), aux, w1, w2), None, None, None, None


frozen_gelu_mlp.register_autograd(_backward, setup_context=_setup)


def fusable(mlp: nn.Module) -> bool:
    """A timm Mlp whose fused form is exact in structure: exact GELU, both biases, no norm, no dropout, frozen."""
    from timm.layers import Mlp

    return (
        type(mlp) is Mlp
        and (isinstance(mlp.act, TableGELU) or is_exact_gelu(mlp.act))
        and isinstance(mlp.norm, nn.Identity)
        and mlp.fc1.bias is not None
        and mlp.fc2.bias is not None
        and not (mlp.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0))
        and not any(p.requires_grad for p in mlp.parameters())
    )


def mlp(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, through `frozen_gelu_mlp` when the module is `fusable` and x is (autocast to) bf16 / fp16."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    if not (dtype in (torch.bfloat16, torch.float16) and fusable(module)):
        return module(x)
    cast = [t.to(dtype) for t in (x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)]
    flat = cast[0].reshape(-1, x.shape[-1]).contiguous()
    return frozen_gelu_mlp(flat, *cast[1:])[0].view(*x.shape[:-1], -1)
