"""Triton kernels of `short_attention`: softmax attention for ViT-length sequences, forward and backward.

Why: a ViT has ~200 tokens (197 for 224 px / 16). Flash kernels tile queries and keys in 64- or
128-row blocks, so 197 tokens cost as 256 (41 % padding), and their backward spends extra passes on
rowsum(dO * O) and on converting an atomically accumulated dQ. Here the keys (and the queries) run in
full blocks plus one small tail block (16 rows for 197 = 3 * 64 + 5), so 197 costs as 208, and one
backward program owns a whole (batch, head): it computes rowsum(dO * O) itself and accumulates dQ
without atomics (a float32 block in global memory, read and written by that program alone, the
last key block writing the result in the input's dtype).

Layouts: q, k, v, o and their gradients are (B, H, N, D) views with unit stride along D (the
(B, N, H * D) outputs of linear layers, viewed per head); lse is (B, H, NQ) float32, log2-based.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _rows(base, rows, stride, n, D: tl.constexpr, MASKED: tl.constexpr):
    """Rows `rows` (< n when MASKED; others read as 0) of a (N, D) matrix with unit stride along D."""
    ptrs = base + rows[:, None] * stride + tl.arange(0, D)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(rows < n)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _forward_block(q, acc, m_i, l_i, k_base, v_base, stride_kn, stride_vn, start, nkv, qk_scale,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """One key block of the online softmax (log2 domain)."""
    keys = start + tl.arange(0, BLOCK_N)
    k = _rows(k_base, keys, stride_kn, nkv, D, MASKED)
    v = _rows(v_base, keys, stride_vn, nkv, D, MASKED)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where((keys < nkv)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    heads, nq, nkv, row0, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = row0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    inside = rows < nq
    q = _rows(q_ptr + b * sqb + h * sqh, rows, sqn, nq, D, True)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full = nkv - nkv % BLOCK_N
    for start in range(0, full, BLOCK_N):
        acc, m_i, l_i = _forward_block(q, acc, m_i, l_i, k_base, v_base, skn, svn, start, nkv, qk_scale,
                                       BLOCK_N, D, False)  # fmt: skip
    if TAIL_N > 0:
        acc, m_i, l_i = _forward_block(q, acc, m_i, l_i, k_base, v_base, skn, svn, full, nkv, qk_scale,
                                       TAIL_N, D, True)  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * son + dims[None, :], out.to(q.dtype), mask=inside[:, None])
    tl.store(lse_ptr + bh.to(tl.int64) * nq + rows, m_i + tl.math.log2(l_i), mask=inside)


@triton.jit
def _backward_query_block(
    k, v, dk, dv, q_base, do_base, dq_base, dqacc_base, lse_base, delta_base, sqn, sdon, sdqn,
    start_m, keys, nq, nkv, qk_scale, sm_scale, later, more, last,
    BLOCK_M: tl.constexpr, D: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, key block) pair: adds to the key block's dk, dv and to the query block's dQ."""
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    inside = rows < nq
    q = _rows(q_base, rows, sqn, nq, D, MASK_M)
    do = _rows(do_base, rows, sdon, nq, D, MASK_M)
    lse = tl.load(lse_base + rows, mask=inside, other=0.0)
    delta = tl.load(delta_base + rows, mask=inside, other=0.0)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where((keys < nkv)[None, :], p, 0.0)
    if MASK_M:
        p = tl.where(inside[:, None], p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(do.dtype)
    dk += tl.dot(tl.trans(ds), q)
    dq = tl.dot(ds, k)
    sums = dqacc_base + rows[:, None] * D + dims[None, :]
    dq += tl.load(sums, mask=inside[:, None] & later, other=0.0)
    tl.store(sums, dq, mask=inside[:, None] & more)
    tl.store(dq_base + rows[:, None] * sdqn + dims[None, :], (dq * sm_scale).to(do.dtype), mask=inside[:, None] & last)
    return dk, dv


@triton.jit
def _backward_key_block(
    k_base, v_base, dk_base, dv_base, q_base, do_base, dq_base, dqacc_base, lse_base, delta_base,
    skn, svn, sdkn, sdvn, sqn, sdon, sdqn, start_n, nq, nkv, qk_scale, sm_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, D: tl.constexpr, MASK_N: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key block, looping over every query block (dQ accumulates meanwhile)."""
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    k = _rows(k_base, keys, skn, nkv, D, MASK_N)
    v = _rows(v_base, keys, svn, nkv, D, MASK_N)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    later = start_n > 0  # dQ sums to read
    more = start_n + BLOCK_N < nkv  # dQ sums to write; else dQ itself
    last = start_n + BLOCK_N >= nkv
    full = nq - nq % BLOCK_M
    for start_m in range(0, full, BLOCK_M):
        dk, dv = _backward_query_block(
            k, v, dk, dv, q_base, do_base, dq_base, dqacc_base, lse_base, delta_base, sqn, sdon, sdqn,
            start_m, keys, nq, nkv, qk_scale, sm_scale, later, more, last, BLOCK_M, D, False, MASK_N,
        )  # fmt: skip
    if TAIL_M > 0:
        dk, dv = _backward_query_block(
            k, v, dk, dv, q_base, do_base, dq_base, dqacc_base, lse_base, delta_base, sqn, sdon, sdqn,
            full, keys, nq, nkv, qk_scale, sm_scale, later, more, last, TAIL_M, D, True, MASK_N,
        )  # fmt: skip
    out_mask = (keys < nkv)[:, None]
    tl.store(dk_base + keys[:, None] * sdkn + dims[None, :], (dk * sm_scale).to(k.dtype), mask=out_mask)
    tl.store(dv_base + keys[:, None] * sdvn + dims[None, :], dv.to(v.dtype), mask=out_mask)
    tl.debug_barrier()  # the next key block reads the dQ sums this one wrote, in other threads' layout


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dqacc_ptr, dq_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    sdqb, sdqh, sdqn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    heads, nq, nkv, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    tl.arange(0, D)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    o_base = o_ptr + b * sob + h * soh
    lse_base = lse_ptr + bh * nq
    delta_base = delta_ptr + bh * nq
    dqacc_base = dqacc_ptr + bh * nq * D
    for start_m in range(0, nq, BLOCK_M):  # rowsum(dO * O) of every query, once
        rows = start_m + tl.arange(0, BLOCK_M)
        inside = rows < nq
        o = _rows(o_base, rows, son, nq, D, True)
        do = _rows(do_base, rows, sdon, nq, D, True)
        tl.store(delta_base + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=inside)
    tl.debug_barrier()
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    dk_base, dv_base = dk_ptr + b * sdkb + h * sdkh, dv_ptr + b * sdvb + h * sdvh
    dq_base = dq_ptr + b * sdqb + h * sdqh
    full = nkv - nkv % BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        _backward_key_block(
            k_base, v_base, dk_base, dv_base, q_base, do_base, dq_base, dqacc_base, lse_base, delta_base,
            skn, svn, sdkn, sdvn, sqn, sdon, sdqn, start_n, nq, nkv, qk_scale, sm_scale,
            BLOCK_N, BLOCK_M, TAIL_M, D, False,
        )  # fmt: skip
    if TAIL_N > 0:
        _backward_key_block(
            k_base, v_base, dk_base, dv_base, q_base, do_base, dq_base, dqacc_base, lse_base, delta_base,
            skn, svn, sdkn, sdvn, sqn, sdon, sdqn, full, nq, nkv, qk_scale, sm_scale,
            TAIL_N, BLOCK_M, TAIL_M, D, True,
        )  # fmt: skip


def tail(n: int, block: int) -> int:
    """Rows of the tail block after n // block full blocks: 0, or n % block rounded up to a power of two >= 16."""
    rest = n % block
    return 0 if rest == 0 else max(16, triton.next_power_of_2(rest))


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _on(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensors' (`--device cuda:1`)
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float,
    block_m: int = 64, block_n: int = 64, tail_m: int = 16, warps: int = 4, stages: int = 2,
) -> None:  # fmt: skip
    """Writes softmax(q k^T * scale) v into o and the rows' log2-sum-exp2 into lse.

    Queries run in blocks of `block_m`, the rest in one launch of `tail_m`-row blocks (0: blocks of
    `block_m` throughout)."""
    batch, heads, nq, d = q.shape
    nkv = k.shape[2]
    split = nq - nq % block_m if tail_m else nq
    launches = [(0, block_m, triton.cdiv(split, block_m))] if split else []
    if split < nq:
        launches.append((split, tail_m or block_m, triton.cdiv(nq - split, tail_m or block_m)))
    with _on(q):
        for row0, rows, programs in launches:
            _forward_kernel[(programs, batch * heads)](
                q, k, v, o, lse, *_strides(q, k, v, o), heads, nq, nkv, row0, scale * LOG2E,
                D=d, BLOCK_M=rows, BLOCK_N=block_n, TAIL_N=tail(nkv, block_n), num_warps=warps, num_stages=stages,
            )  # fmt: skip


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, scale: float,
    block_m: int = 64, block_n: int = 64, warps: int = 4, stages: int = 2,
) -> None:  # fmt: skip
    """Writes the gradients of `forward`'s o (given do) into dq, dk and dv: one program per (batch, head)."""
    batch, heads, nq, d = q.shape
    nkv = k.shape[2]
    delta = torch.empty(batch * heads * nq, device=q.device, dtype=torch.float32)
    dq_sums = torch.empty(batch * heads * nq * d, device=q.device, dtype=torch.float32) if nkv > block_n else delta
    with _on(q):
        _backward_kernel[(batch * heads,)](
            q, k, v, o, do, lse, delta, dq_sums, dq, dk, dv, *_strides(q, k, v, o, do, dq, dk, dv),
            heads, nq, nkv, scale * LOG2E, scale,
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, TAIL_M=tail(nq, block_m), TAIL_N=tail(nkv, block_n),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
