"""The GELU MLP of a frozen ViT block, fused (backbones.fused_mlp) against timm's, forward + backward.

Times one MLP at ViT-B/16 and ViT-L/16 shapes (batch 256 x 197 tokens, bf16, frozen weights, input
that requires grad, as in LayerNorm tuning), both under torch.compile, and the Triton GEMM alone
against cuBLAS's; checks that outputs and input gradients agree to bf16 rounding.

    python benchmarks/fused_mlp.py                 # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
from timm.layers import Mlp

from lnshift.backbones.fused_mlp import FORWARD, _gemm_gelu_tuned, gemm_gelu, use_fused_mlp
from lnshift.config import environment
from lnshift.rundir import write_json


def bench(fn, warmup: int = 5, steps: int = 20) -> float:
    """Milliseconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def one_shape(tokens: int, dim: int, hidden: int) -> dict:
    torch.manual_seed(0)
    plain = Mlp(dim, hidden).cuda().to(torch.bfloat16).requires_grad_(False)
    fused = copy.deepcopy(plain)
    use_fused_mlp(fused)
    x = torch.randn(tokens // 197, 197, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens // 197, 197, dim, device="cuda", dtype=torch.bfloat16)
    row: dict = {"tokens": tokens, "dim": dim, "hidden": hidden}
    outs = {}
    for label, module in (("timm", plain), ("fused", fused)):
        compiled = torch.compile(module)

        def step(compiled=compiled) -> torch.Tensor:
            x.grad = None
            y = compiled(x)
            y.backward(dy)
            return y

        y = step()
        outs[label] = (y.float(), x.grad.float())
        row[f"{label}_fwd_bwd_ms"] = bench(step)
        with torch.no_grad():
            row[f"{label}_fwd_ms"] = bench(lambda compiled=compiled: compiled(x))
    (y0, g0), (y1, g1) = outs["timm"], outs["fused"]
    row["max_abs_diff_y"] = (y0 - y1).abs().max().item()
    row["max_abs_diff_dx"] = (g0 - g1).abs().max().item()
    row["max_abs_y"], row["max_abs_dx"] = y0.abs().max().item(), g0.abs().max().item()
    a = x.detach().reshape(-1, dim)
    w = plain.fc1.weight
    h, g = a.new_empty(a.shape[0], hidden), a.new_empty(a.shape[0], hidden)
    flops = 2 * a.shape[0] * dim * hidden
    row["cublas_gemm_ms"] = bench(lambda: torch.addmm(plain.fc1.bias, a, w.t()))
    row["triton_gemm_gelu_ms"] = bench(lambda: gemm_gelu(a, w.t(), plain.fc1.bias, h, g, FORWARD))
    row["cublas_tflops"] = flops / row["cublas_gemm_ms"] / 1e9
    row["triton_tflops"] = flops / row["triton_gemm_gelu_ms"] / 1e9
    row["triton_config"] = str(_gemm_gelu_tuned.best_config)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    rows = [one_shape(256 * 197, 768, 3072), one_shape(256 * 197, 1024, 4096)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, {"command": " ".join(sys.argv), "environment": environment(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
