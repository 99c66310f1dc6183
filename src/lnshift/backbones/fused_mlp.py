"""timm's GELU MLP with the activation computed inside the matrix products, for frozen MLP weights.

Why: in LayerNorm tuning the MLP weights are frozen, so an MLP costs four GEMMs (fc1 and fc2
forward; in the backward only the input gradients of fc2 and fc1) plus two element-wise passes over
the 4x-wide hidden tensor: GELU, and GELU's derivative. On an H200 those two passes took 6.6 of the
50 ms of a compiled ViT-B/16 step and 19 of the 150 ms of a ViT-L/16 step: they read and write
hundreds of megabytes at a fraction of the GPU's bandwidth. Here one Triton GEMM does both jobs in
its epilogue:
- forward: h = x @ fc1.weight.T + fc1.bias, and g = gelu(h), written together (h is what the
  backward needs; g feeds fc2);
- backward: dh = (dy @ fc2.weight) * gelu'(h), then dx = dh @ fc1.weight (cuBLAS).
Values are rounded to the compute dtype where the unfused path rounds them (h, and fc2's input
gradient before gelu'), so the two paths agree to bf16 rounding. GELU is the exact (erf) one.

`use_fused_mlp` swaps the class of every timm `Mlp` with exact GELU and no dropout or hidden norm
in place (parameters and state-dict keys unchanged). A swapped MLP takes the fused path only while
none of its weights train (LN tuning, linear probing, evaluation); full fine-tuning, LoRA on the MLP
or BitFit take timm's own forward. On CUDA in bf16/fp16 the kernel is Triton's; elsewhere the
custom op computes the same thing with torch operations, so CPU runs and tests go through the same
op, autograd formula and torch.compile path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the op's torch implementation is used
    triton = None

FORWARD, FORWARD_ONLY, BACKWARD = 0, 1, 2  # the GEMM's epilogues
BLOCK_K = 64  # every configuration's K step; K % BLOCK_K decides whether loads along K need masks
KERNEL_DTYPES = (torch.bfloat16, torch.float16)

if triton is not None:
    SQRT1_2 = tl.constexpr(0.7071067811865476)
    INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
    EPILOGUE_BACKWARD = tl.constexpr(BACKWARD)
    EPILOGUE_FORWARD = tl.constexpr(FORWARD)

    @triton.jit
    def _gemm_gelu_kernel(
        a_ptr,
        b_ptr,
        bias_ptr,
        h_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        EPILOGUE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out (M, N) = epilogue(a (M, K) @ b (K, N)); h and out are contiguous (M, N)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n  # tiles in row groups of GROUP_M, so neighbours share b in L2
        first_m = (pid // per_group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
        rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rbn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        dtype = out_ptr.dtype.element_ty
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offsets = rm[:, None] * N + rn[None, :]
        if EPILOGUE == EPILOGUE_BACKWARD:  # acc = fc2's input gradient; times gelu'(h)
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(h * SQRT1_2))
            pdf = tl.exp(-0.5 * h * h) * INV_SQRT_2PI
            out = acc.to(dtype).to(tl.float32) * (cdf + h * pdf)
        else:  # acc = fc1's output before the bias
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            h = acc.to(dtype)
            if EPILOGUE == EPILOGUE_FORWARD:
                tl.store(h_ptr + offsets, h, mask=mask)
            hf = h.to(tl.float32)
            out = 0.5 * hf * (1.0 + tl.math.erf(hf * SQRT1_2))
        tl.store(out_ptr + offsets, out.to(dtype), mask=mask)

    def _config(m: int, n: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, warps, stages)

    # Hopper-sized tiles; the autotuner times them once per (M, N, K, epilogue)
    _gemm_gelu_tuned = triton.autotune(
        [
            _config(128, 256, 8, 3),
            _config(128, 256, 8, 4),
            _config(256, 128, 8, 3),
            _config(128, 128, 8, 4),
            _config(128, 128, 4, 4),
            _config(64, 256, 4, 4),
        ],
        key=["M", "N", "K", "EPILOGUE"],
    )(_gemm_gelu_kernel)


def gemm_gelu(a: Tensor, b: Tensor, bias: Tensor | None, h: Tensor, out: Tensor, epilogue: int) -> None:
    """Run the Triton kernel: out = epilogue(a @ b) for 2-D a (M, K) and b (K, N) of any strides.

    FORWARD writes h = a @ b + bias and out = gelu(h); FORWARD_ONLY writes only out; BACKWARD
    reads h and writes out = (a @ b) * gelu'(h). On a CPU tensor (Triton's interpreter,
    TRITON_INTERPRET=1) one small fixed tile size is used instead of autotuning.
    """
    m, k = a.shape
    n = b.shape[1]
    args = (a, b, bias if bias is not None else out, h, out, m, n, k, *a.stride(), *b.stride())
    flags = {"EPILOGUE": epilogue, "HAS_BIAS": bias is not None, "EVEN_K": k % BLOCK_K == 0}
    if a.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm_gelu_tuned[grid](*args, **flags)
    else:
        tiles = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": BLOCK_K, "GROUP_M": 2}
        _gemm_gelu_kernel[(triton.cdiv(m, 32) * triton.cdiv(n, 32),)](*args, **flags, **tiles)


def use_kernel(x: Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dtype in KERNEL_DTYPES


@torch.library.custom_op("lnshift::gelu_mlp", mutates_args=())
def gelu_mlp(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, keep_hidden: bool
) -> tuple[Tensor, Tensor]:
    """fc2(gelu(fc1(x))) and fc1's output h (what the backward needs; empty unless keep_hidden)."""
    x2 = x.reshape(-1, x.shape[-1])
    if use_kernel(x):
        h = x2.new_empty(x2.shape[0], w1.shape[0]) if keep_hidden else x2.new_empty(0)
        g = x2.new_empty(x2.shape[0], w1.shape[0])
        gemm_gelu(x2, w1.t(), b1, h, g, FORWARD if keep_hidden else FORWARD_ONLY)
    else:
        h = F.linear(x2, w1, b1)
        g = F.gelu(h)
        h = h if keep_hidden else x2.new_empty(0)
    y = F.linear(g, w2, b2)
    return y.view(*x.shape[:-1], w2.shape[0]), h


@gelu_mlp.register_fake
def _(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, keep_hidden: bool):
    rows = x.numel() // x.shape[-1]
    h = x.new_empty(rows, w1.shape[0]) if keep_hidden else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], w2.shape[0]), h


@torch.library.custom_op("lnshift::gelu_mlp_backward", mutates_args=())
def gelu_mlp_backward(dy: Tensor, h: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """The input gradient of gelu_mlp for frozen weights: ((dy @ w2) * gelu'(h)) @ w1."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    if use_kernel(dy):
        dh = torch.empty_like(h)
        gemm_gelu(dy2, w2, None, h, dh, BACKWARD)
    else:
        dh = torch.ops.aten.gelu_backward(dy2 @ w2, h)
    return (dh @ w1).view(*dy.shape[:-1], w1.shape[1])


@gelu_mlp_backward.register_fake
def _(dy: Tensor, h: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    return dy.new_empty(*dy.shape[:-1], w1.shape[1])


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    _, w1, _, w2, _, keep_hidden = inputs
    if not keep_hidden:
        raise RuntimeError("lnshift::gelu_mlp: a backward needs keep_hidden=True")
    ctx.save_for_backward(output[1], w1, w2)


def _backward(ctx, dy: Tensor, _dh: Tensor) -> tuple:
    h, w1, w2 = ctx.saved_tensors  # weights are frozen: only x gets a gradient
    return gelu_mlp_backward(dy, h, w1, w2), None, None, None, None, None


gelu_mlp.register_autograd(_backward, setup_context=_setup_context)


class FusedGeluMlp(Mlp):
    """timm's Mlp (exact GELU, no dropout, no hidden norm); gelu_mlp while its weights are frozen."""

    def forward(self, x: Tensor) -> Tensor:
        linears = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if any(p is not None and p.requires_grad for p in linears):
            return super().forward(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        w1, b1, w2, b2 = (p.to(dtype) if p is not None else None for p in linears)
        keep_hidden = torch.is_grad_enabled() and x.requires_grad
        return gelu_mlp(x.to(dtype), w1, b1, w2, b2, keep_hidden)[0]


def is_gelu_mlp(module: nn.Module) -> bool:
    """A timm Mlp that FusedGeluMlp computes exactly: linear layers, exact GELU, no dropout or norm."""
    return (
        type(module) is Mlp
        and type(module.fc1) is nn.Linear
        and type(module.fc2) is nn.Linear
        and type(module.act) is nn.GELU
        and module.act.approximate == "none"
        and isinstance(module.norm, nn.Identity)
        and module.drop1.p == 0
        and module.drop2.p == 0
    )


def use_fused_mlp(model: nn.Module) -> int:
    """Swap every exact-GELU timm Mlp of `model` to FusedGeluMlp in place; returns how many were switched."""
    mlps = [m for m in model.modules() if is_gelu_mlp(m)]
    for mlp in mlps:
        mlp.__class__ = FusedGeluMlp
    return len(mlps)
