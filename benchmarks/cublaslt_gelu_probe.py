# ruff: noqa  (a one-off probe, removed in the next commit; kept in history for the README's numbers)
"""cuBLASLt GELU epilogues (nvmath-python 1.0.0) vs cuBLAS + the table GELU on the MLP shapes of ViT-B/L at batch 256.

Run on a GPU: pip install nvmath-python; PYTHONPATH=src python benchmarks/cublaslt_gelu_probe.py"""

import time, torch, torch.nn.functional as F
from lnshift.backbones import gelu_table as gt
from nvmath.linalg.advanced import Matmul, MatmulEpilog as E

torch.manual_seed(0)
dev = "cuda"


def bench(fn, n=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n, (time.perf_counter() - t0) / n * 1e3


for name, K, N in (("vitb", 768, 3072), ("vitl", 1024, 4096)):
    M = 256 * 197
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    W1 = (torch.randn(N, K, device=dev) * K**-0.5).bfloat16()
    b1 = (torch.randn(N, device=dev) * 0.1).bfloat16()
    W2 = (torch.randn(K, N, device=dev) * N**-0.5).bfloat16()
    dY = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    a = F.linear(x, W1, b1)
    base_f = bench(lambda: gt.gelu_bf16(F.linear(x, W1, b1)))
    base_b = bench(lambda: gt.gelu_bf16_backward(dY @ W2, a))
    lin_f = bench(lambda: F.linear(x, W1, b1))
    lin_b = bench(lambda: dY @ W2)
    s = torch.cuda.current_stream()
    mf = Matmul(W1, x.T, stream=s)
    mf.plan(epilog=E.GELU_AUX_BIAS, epilog_inputs={"bias": b1}, stream=s)
    out = mf.execute(stream=s)
    hT, aux = out
    print(
        name,
        "fwd out",
        type(hT),
        hT.shape,
        hT.stride(),
        hT.dtype,
        {k: (v.shape, v.stride(), v.dtype) for k, v in aux.items()},
        flush=True,
    )
    ref_h = gt.gelu_bf16(a)
    ref_tanh = F.gelu(a.float(), approximate="tanh").bfloat16()
    print(
        name,
        "h vs exact-table: max",
        (hT.T.float() - ref_h.float()).abs().max().item(),
        "frac differ",
        (hT.T != ref_h).float().mean().item(),
        "| vs torch tanh: frac differ",
        (hT.T != ref_tanh).float().mean().item(),
        "aux==a",
        (aux["gelu_aux"].T == a).float().mean().item(),
        flush=True,
    )
    nv_f = bench(lambda: mf.execute(stream=s))
    mb = Matmul(W2.T, dY.T, stream=s)
    mb.plan(epilog=E.DGELU, epilog_inputs={"gelu_aux": aux["gelu_aux"]}, stream=s)
    dAT = mb.execute(stream=s)
    dAT = dAT[0] if isinstance(dAT, tuple) else dAT
    ref_dA = gt.gelu_bf16_backward(dY @ W2, a)
    rel = ((dAT.T.float() - ref_dA.float()).abs().max() / ref_dA.float().abs().max()).item()
    print(name, "dA rel max diff vs exact", rel, flush=True)
    nv_b = bench(lambda: mb.execute(stream=s))
    print(
        f"{name}: fwd cuBLAS+table {base_f[0]:.3f} ms (linear alone {lin_f[0]:.3f}) | Lt GELU_AUX_BIAS {nv_f[0]:.3f} ms (host {nv_f[1]:.3f})"
    )
    print(
        f"{name}: bwd cuBLAS+table {base_b[0]:.3f} ms (mm alone {lin_b[0]:.3f}) | Lt DGELU {nv_b[0]:.3f} ms (host {nv_b[1]:.3f})",
        flush=True,
    )
