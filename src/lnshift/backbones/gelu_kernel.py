"""Triton kernels of the table GELU (`gelu_table`): bf16 GELU and its backward by table lookup.

The caller passes each table with its layout (`gelu_table.Layout`: lo, hi, half), so this module
imports nothing of `gelu_table`, which imports it only where Triton is there.

Each program loads its table into registers once and looks its inputs up with `tl.gather`
(through shared memory); the few inputs outside the table follow the rules `gelu_table` states.
Per element they still execute a few dozen instructions, so the block size matters: a program of
8,192 elements (8 warps) was the fastest of those tried (persistent grids were not faster; rates in
benchmarks/results/README.md).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

BLOCK = 8192  # elements per program
WARPS = 8
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, chosen at import as Triton does


@triton.jit
def _lookup(x, LO: tl.constexpr, HI: tl.constexpr, HALF: tl.constexpr):
    """(table index, |x|'s bits, sign) of bf16 x, as gelu_table._lookup."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    mag = bits & 0x7FFF
    k = tl.minimum(tl.maximum(mag - LO, 0), HI - LO - 1)
    negative = bits >= 0x8000
    return tl.where(negative, k + HALF, k), mag, negative


@triton.jit
def _to_bf16(v, BITWISE: tl.constexpr):
    """float32 -> bf16, to nearest even. The GPU's conversion does that; Triton's CPU interpreter
    truncates, so there (BITWISE) the rounding is done on the bits."""
    if BITWISE:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(v != v, 0x7FC0, bits).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(tl.bfloat16)


@triton.jit
def _half(x, mag, negative, BITWISE: tl.constexpr):
    """x / 2 in bf16, to nearest even. The interpreter also converts bf16 subnormals wrongly, so
    there it is done on the bits: below 2**-125, |x| = mag * 2**-133 exactly."""
    if BITWISE:
        half = tl.where(mag < 256, (mag >> 1) + (mag & (mag >> 1) & 1), mag - 128)
        return tl.where(negative, half | 0x8000, half).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return (x.to(tl.float32) * 0.5).to(tl.bfloat16)


@triton.jit
def _gelu_kernel(
    x_ptr, y_ptr, table_ptr, n, LO: tl.constexpr, HI: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    BITWISE: tl.constexpr,
):  # fmt: skip
    table = tl.load(table_ptr + tl.arange(0, 2 * HALF))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    idx, mag, negative = _lookup(x, LO, HI, HALF)
    y = tl.gather(table, idx, 0)
    y = tl.where(mag < LO, _half(x, mag, negative, BITWISE), y)
    minus_zero = tl.where(mag >= 0x7F80, 0x7FC0, 0x8000).to(tl.int16).to(tl.bfloat16, bitcast=True)
    y = tl.where(mag >= HI, tl.where(negative, minus_zero, x), y)  # x * 0: -0, or NaN for -inf, as torch
    tl.store(y_ptr + offs, y, mask=inside)


@triton.jit
def _gelu_backward_kernel(
    x_ptr, dy_ptr, dx_ptr, table_ptr, n, LO: tl.constexpr, HI: tl.constexpr, HALF: tl.constexpr,
    BLOCK: tl.constexpr, BITWISE: tl.constexpr,
):  # fmt: skip
    table = tl.load(table_ptr + tl.arange(0, 2 * HALF))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    idx, mag, negative = _lookup(x, LO, HI, HALF)
    slope = tl.gather(table, idx, 0)
    slope = tl.where(mag < LO, 0.5, slope)
    slope = tl.where(mag >= HI, tl.where(negative, 0.0, 1.0), slope)
    slope = tl.where(mag >= 0x7F80, float("nan"), slope)  # inf and NaN: NaN, as torch's gelu_backward
    tl.store(dx_ptr + offs, _to_bf16(dy * slope, BITWISE), mask=inside)


def _launch(kernel: triton.JITFunction, layout: tuple[int, int, int], n: int, *args: torch.Tensor) -> None:
    lo, hi, half = layout
    if n == 0:  # an empty grid is not a launch
        return
    # Triton launches on the current CUDA device, which need not be the tensors' (`--device cuda:1`)
    on_device = torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext()
    with on_device:
        kernel[(triton.cdiv(n, BLOCK),)](
            *args,
            n,
            LO=lo,
            HI=hi,
            HALF=half,
            BLOCK=BLOCK,
            BITWISE=INTERPRETED,
            num_warps=WARPS,
        )


def gelu_forward(x: torch.Tensor, table: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """GELU of a contiguous bf16 tensor through the bf16 `table` of `layout` (gelu_table.GELU_LAYOUT)."""
    y = torch.empty_like(x)
    _launch(_gelu_kernel, layout, x.numel(), x, y, table)
    return y


def gelu_backward(dy: torch.Tensor, x: torch.Tensor, table: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """dy * GELU'(x) for contiguous bf16 tensors, the slope from the float32 `table` of `layout` (SLOPE_LAYOUT)."""
    dx = torch.empty_like(x)
    _launch(_gelu_backward_kernel, layout, x.numel(), x, dy, dx, table)
    return dx
