# ruff: noqa  (a one-off probe of issue 7, kept as it ran on the H200; removed in the next commit)
"""Probe: FlashAttention-4's SM90 (FA3-design) kernels vs cuDNN SDPA at ViT's 197 tokens, head dim 64."""

import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

t0 = time.time()
import flash_attn.cute.interface as fi  # noqa: E402

print("fa4 import s", round(time.time() - t0, 1), flush=True)
OUT = os.environ.get("OUT", ".")
res = {}


def bench(fn):
    return do_bench(fn, warmup=25, rep=200)


BWD = {
    "default": None,
    "m64n128": fi.BwdConfig(64, 128, 2, 2, 2, True, False, False, 1, 2, 1, dQ_single_wg=True),
    "m64n64": fi.BwdConfig(64, 64, 2, 2, 2, True, False, False, 1, 2, 1, dQ_single_wg=True),
}
orig_bwd_cfg = fi._tile_size_bwd_sm90
for name, H in (("vitb", 12), ("vitl", 16)):
    B, N, D = 256, 197, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    scale = D**-0.5
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
    r = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        f = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        qq, kk, vv = (t.detach().requires_grad_() for t in (qt, kt, vt))

        def fb():
            o = F.scaled_dot_product_attention(qq, kk, vv)
            torch.autograd.grad(o, (qq, kk, vv), dot)

        r["cudnn"] = [f, bench(fb) - f]
    print(name, "cudnn fwd %.3f bwd %.3f" % tuple(r["cudnn"]), flush=True)
    qf, kf, vf = (t.float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf)
    ref.backward(do.float().transpose(1, 2))
    ref_o = ref.detach().transpose(1, 2)
    ref_g = [t.grad.transpose(1, 2) for t in (qf, kf, vf)]
    fwd_tiles = [None, (128, 128), (64, 128), (128, 208), (64, 208)] if name == "vitb" else [None, (128, 128)]
    for tile in fwd_tiles:
        try:
            t1 = time.time()
            out, lse, *_ = fi._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True, tile_mn=tile)
            torch.cuda.synchronize()
            compile_s = time.time() - t1
            err = (out.float() - ref_o).abs().max().item()
            t = bench(lambda: fi._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True, tile_mn=tile))
            r[f"fwd {tile}"] = [t, err, compile_s]
            print(name, "fa4 fwd", tile, "%.3f ms err %.2e compile %.0f s" % (t, err, compile_s), flush=True)
            if tile is None:
                print("  out", tuple(out.shape), out.stride(), "lse", tuple(lse.shape), lse.stride(), lse.dtype)
        except Exception as e:
            print(name, "fa4 fwd", tile, "failed", type(e).__name__, str(e)[:300], flush=True)
    out, lse, *_ = fi._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)
    for label, cfg in BWD.items():
        if name == "vitl" and label != "default":
            continue
        fi._tile_size_bwd_sm90 = orig_bwd_cfg if cfg is None else (lambda *a, cfg=cfg, **kw: cfg)
        try:
            t1 = time.time()
            dq, dk, dv = fi._flash_attn_bwd(q, k, v, out, do, lse, scale)
            torch.cuda.synchronize()
            compile_s = time.time() - t1
            errs = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip((dq, dk, dv), ref_g)]
            t = bench(lambda: fi._flash_attn_bwd(q, k, v, out, do, lse, scale))
            r[f"bwd {label}"] = [t, errs, compile_s]
            print(
                name,
                "fa4 bwd",
                label,
                "%.3f ms rel errs %s compile %.0f s" % (t, ["%.1e" % e for e in errs], compile_s),
                flush=True,
            )
        except Exception as e:
            print(name, "fa4 bwd", label, "failed", type(e).__name__, str(e)[:300], flush=True)
            traceback.print_exc(limit=3)
    fi._tile_size_bwd_sm90 = orig_bwd_cfg
    res[name] = r
    json.dump(res, open(f"{OUT}/fa4_probe.json", "w"), indent=1)
