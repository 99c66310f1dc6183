# ruff: noqa  (the one-off probe exactly as it ran on the H200; removed again in the next commits)
"""Probe: QuACK (CuTe DSL) GEMMs with GELU epilogues vs cuBLAS + table GELU, ViT MLP shapes on H200."""

import sys, time, json, os
import torch

t0 = time.time()
import quack
from quack.epilogue import gemm_epilogue
from quack.activation import act_fn_map, dact_fn_map
from quack.gemm_interface import gemm as qgemm

print("quack", getattr(quack, "__version__", "?"), "import s", round(time.time() - t0, 1), flush=True)
from lnshift.backbones.gelu_table import gelu_bf16, gelu_bf16_backward

GELU = act_fn_map["gelu_erf"]
DGELU = dact_fn_map["gelu_erf"]


@gemm_epilogue(outputs=("postact",))
def fc1_gelu(acc, bias):
    z = acc + bias
    return {"D": z, "postact": GELU(z)}


@gemm_epilogue()
def fc2_dgelu(acc, c):
    dz, _ = DGELU(c, acc)
    return {"D": dz}


def bench(fn, reps=30, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


dev = torch.device("cuda")
res = {}
tuned = os.environ.get("QTUNED", "0") == "1"
for name, C, H in (("vitb", 768, 3072), ("vitl", 1024, 4096)):
    M = 256 * 197
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, C, device=dev, dtype=torch.bfloat16, generator=g)
    w1 = (torch.randn(H, C, device=dev, generator=g) * C**-0.5).bfloat16()
    b1 = (torch.randn(H, device=dev, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(C, H, device=dev, generator=g) * H**-0.5).bfloat16()
    dy = torch.randn(M, C, device=dev, dtype=torch.bfloat16, generator=g)
    wsq = (torch.randn(C, C, device=dev, generator=g) * C**-0.5).bfloat16()
    r = {}
    # plain products: cuBLAS vs QuACK default config
    for pname, a, b in (
        ("CxC", x, wsq.t()),
        ("CxH", x, w1.t()),
        ("HxC", torch.randn(M, H, device=dev, dtype=torch.bfloat16), w2.t()),
    ):
        flop = 2 * M * a.shape[1] * b.shape[1]
        tc = bench(lambda: torch.mm(a, b))
        t1 = time.time()
        try:
            out = qgemm(a, b, tuned=tuned)
            err = (out.float() - torch.mm(a, b).float()).abs().max().item()
            tq = bench(lambda: qgemm(a, b, tuned=tuned))
        except Exception as ex:  # noqa
            print(pname, "quack gemm failed:", repr(ex)[:800], flush=True)
            tq, err = float("nan"), float("nan")
        r[pname] = dict(
            cublas_ms=tc,
            quack_ms=tq,
            cublas_tflops=flop / tc / 1e9,
            quack_tflops=flop / tq / 1e9,
            maxerr=err,
            first_call_s=time.time() - t1,
        )
        print(name, pname, {k: round(v, 4) for k, v in r[pname].items()}, flush=True)

    # MLP forward: addmm + table GELU vs fc1_gelu
    def ref_fwd():
        h = torch.addmm(b1, x, w1.t())
        return h, gelu_bf16(h)

    h_ref, g_ref = ref_fwd()
    t1 = time.time()
    try:
        out = fc1_gelu(x, w1.t(), bias=b1, tuned=tuned)
        print(
            name,
            "fc1_gelu first call s",
            round(time.time() - t1, 1),
            {k: (tuple(v.shape), v.dtype) for k, v in out.items()},
            flush=True,
        )
        dh_ = (out["D"].float() - h_ref.float()).abs().max().item()
        dg_ = (out["postact"].float() - g_ref.float()).abs().max().item()
        ulp = (out["postact"] != g_ref).float().mean().item()
        tf = bench(lambda: fc1_gelu(x, w1.t(), bias=b1, tuned=tuned))
    except Exception as ex:  # noqa
        import traceback

        traceback.print_exc()
        tf, dh_, dg_, ulp = float("nan"), float("nan"), float("nan"), float("nan")
    tr = bench(ref_fwd)
    r["fwd"] = dict(ref_ms=tr, fused_ms=tf, max_diff_preact=dh_, max_diff_postact=dg_, frac_postact_differ=ulp)
    print(name, "fwd", r["fwd"], flush=True)

    # MLP backward's first product: dy @ W2 then table GELU' vs fc2_dgelu
    def ref_bwd():
        return gelu_bf16_backward(torch.mm(dy, w2), h_ref)

    d_ref = ref_bwd()
    t1 = time.time()
    try:
        out = fc2_dgelu(dy, w2, h_ref, tuned=tuned)
        print(name, "fc2_dgelu first call s", round(time.time() - t1, 1), flush=True)
        dd = (out["D"].float() - d_ref.float()).abs().max().item()
        rel = ((out["D"].float() - d_ref.float()).norm() / d_ref.float().norm()).item()
        tb = bench(lambda: fc2_dgelu(dy, w2, h_ref, tuned=tuned))
    except Exception as ex:  # noqa
        import traceback

        traceback.print_exc()
        tb, dd, rel = float("nan"), float("nan"), float("nan")
    trb = bench(ref_bwd)
    r["bwd"] = dict(ref_ms=trb, fused_ms=tb, max_diff=dd, rel_diff=rel)
    print(name, "bwd", r["bwd"], flush=True)
    res[name] = r
out = os.environ.get("OUT")
if out:
    json.dump(res, open(f"{out}/qprobe_{'tuned' if tuned else 'default'}.json", "w"), indent=1)
