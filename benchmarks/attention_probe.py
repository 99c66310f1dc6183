# ruff: noqa  (a one-off probe, removed in the next commit; kept in history for the README's numbers)
"""Probe (issue 7): lnshift's Triton short-sequence attention (backbones.attention_kernel) against SDPA's
cuDNN and FlashAttention-2 at ViT-B/16 and ViT-L/16 shapes (batch 256, 197 tokens, bf16), forward and
backward, over a grid of block sizes; prints ms and the error against float32 SDPA; JSON to $OUT.
Run on a GPU: PYTHONPATH=src python benchmarks/attention_probe.py"""

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, "src")
from lnshift.backbones import attention_kernel as ak

OUT = os.environ.get("OUT", ".")
res = {}


def qkv(B, H, N, D, nq=None):
    def g(n):
        return torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    return g(nq or N), g(N), g(N)


for name, H in (("vitb", 12), ("vitl", 16)):
    B, N, D = 256, 197, 64
    q, k, v = qkv(B, H, N, D)
    scale = D**-0.5
    do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    r = {}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            f = do_bench(lambda: F.scaled_dot_product_attention(qq, kk, vv), warmup=50, rep=300)

            def fb():
                out = F.scaled_dot_product_attention(qq, kk, vv)
                torch.autograd.grad(out, (qq, kk, vv), do)

            t = do_bench(fb, warmup=50, rep=300)
        r[backend] = (f, t - f)
        print(name, backend, f"fwd {f:.3f} bwd {t - f:.3f} ms", flush=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    o = torch.empty(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    lse = torch.empty(B, H, N, device="cuda")
    best = None
    for bm, bn, tm, w, st in itertools.product((64, 128), (32, 64), (0, 16), (4, 8), (2, 3)):
        try:

            def fn():
                return ak.forward(q, k, v, o, lse, scale, block_m=bm, block_n=bn, tail_m=tm, warps=w, stages=st)

            fn()
            torch.cuda.synchronize()
            err = (o.float() - ref).abs().max().item()
            t = do_bench(fn, warmup=30, rep=200)
        except Exception as e:
            print("fwd", bm, bn, tm, w, st, "failed", type(e).__name__, str(e)[:200])
            continue
        r[f"fwd {bm} {bn} {tm} {w} {st}"] = (t, err)
        print(name, "fwd", bm, bn, tm, w, st, f"{t:.3f} ms err {err:.2e}", flush=True)
        if best is None or t < best[0]:
            best = (t, bm, bn, tm, w, st)
    r["best_fwd"] = best
    t, bm, bn, tm, w, st = best
    ak.forward(q, k, v, o, lse, scale, block_m=bm, block_n=bn, tail_m=tm, warps=w, stages=st)
    qf, kf, vf = (t_.float().requires_grad_() for t_ in (q, k, v))
    reff = F.scaled_dot_product_attention(qf, kf, vf)
    reff.backward(do.float())
    grads = [torch.empty_like(t_) for t_ in (q, k, v)]
    bestb = None
    for bm, bn, w, st in itertools.product((32, 64), (32, 64), (4, 8), (1, 2)):
        try:

            def fn():
                return ak.backward(q, k, v, o, do, lse, *grads, scale, block_m=bm, block_n=bn, warps=w, stages=st)

            fn()
            torch.cuda.synchronize()
            errs = [
                ((a.float() - b.grad).abs().max() / b.grad.abs().max()).item()
                for a, b in zip(grads, (qf, kf, vf), strict=False)
            ]
            t = do_bench(fn, warmup=30, rep=200)
        except Exception as e:
            print("bwd", bm, bn, w, st, "failed", type(e).__name__, str(e)[:200])
            continue
        r[f"bwd {bm} {bn} {w} {st}"] = (t, errs)
        print(name, "bwd", bm, bn, w, st, "{:.3f} ms errs {}".format(t, [f"{e:.1e}" for e in errs]), flush=True)
        if bestb is None or t < bestb[0]:
            bestb = (t, bm, bn, w, st)
    r["best_bwd"] = bestb
    print(name, "BEST fwd", best, "bwd", bestb, "cudnn", r["CUDNN_ATTENTION"], flush=True)
    res[name] = r
    json.dump(res, open(f"{OUT}/attn_probe.json", "w"), indent=1)
