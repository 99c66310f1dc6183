"""Probes behind issue 7's profile, on one GPU: the crop kernel against the roi_align path, the memory
rate of pointwise kernels (inductor's exact GELU and its derivative, the table GELU, plain copies),
the table GELU kernels against their torch lookup on every bf16 input, cuBLAS against cuBLASLt on
the ViTs' matrix products, SDPA's attention backends at 197 tokens, and inductor's autotuned GEMM
templates with the MLP's GELU fused into their epilogue against cuBLAS + the table GELU.

A pointwise kernel that reads and writes bf16 is limited by memory unless its arithmetic is costly;
the probe shows which of the GELU kernels in a ViT step are (their shape: the MLPs of ViT-B/16 and
ViT-L/16 at batch 256).

    python benchmarks/kernel_probes.py --out benchmarks/results/kernel_probes_h200.json   # on a GPU
    python benchmarks/kernel_probes.py --parts epilogue   # one probe (PARTS)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from throughput import first_sync  # this folder, as scripts run from it

from lnshift.backbones import gelu_table
from lnshift.config import environment
from lnshift.data import device as dd
from lnshift.data.crop_kernel import resized_crops
from lnshift.rundir import write_json


def milliseconds(fn: Callable[[], object], repeat: int = 50) -> float:
    """Mean device time of `fn` over `repeat` calls after 5 untimed ones (CUDA events)."""
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeat


def crop_probe(batch: int, sources: int, side: int, out: int) -> dict:
    """The Triton crop kernel against roi_align + flip + normalise on the same draws: time and max difference."""
    gen = torch.Generator().manual_seed(0)
    config = {"input_size": (3, out, out), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    raw = torch.randint(0, 256, (sources, 3, side, side), dtype=torch.uint8, generator=gen).cuda()
    images = dd.DeviceImages(raw, torch.arange(sources).cuda(), config, crops=True)
    boxes = dd.crop_boxes(batch, side, side, gen).cuda()
    idx = torch.randint(0, sources, (batch,), generator=gen).cuda()
    flips = (torch.rand(batch, generator=gen) < 0.5).cuda()

    def kernel() -> torch.Tensor:
        return resized_crops(raw, idx, boxes, flips, (out, out), images.mean, images.std)

    def roi_align_path() -> torch.Tensor:
        return dd.roi_align_crops(images, idx, boxes, flips)

    torch.cuda.synchronize()
    return {
        "shape": [batch, 3, out, out],
        "host_sync": first_sync(kernel),  # a host-device sync per batch would idle the GPU every step
        "source_side": side,
        "kernel_ms": milliseconds(kernel),
        "roi_align_path_ms": milliseconds(roi_align_path),
        "max_abs_diff": (kernel() - roi_align_path()).abs().max().item(),
    }


def pointwise_probe(rows: int, cols: int) -> dict:
    """TB/s of compiled pointwise kernels on a (rows, cols) bf16 tensor: bytes read + written / device time."""
    h = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(h)
    ops: dict[str, tuple[Callable, tuple]] = {
        "x*2 (copy)": (lambda a: a * 2, (h,)),
        "relu": (F.relu, (h,)),
        "gelu (exact, erf)": (F.gelu, (h,)),
        "gelu (tanh)": (lambda a: F.gelu(a, approximate="tanh"), (h,)),
        "x*y": (lambda a, b: a * b, (h, g)),
        "gelu backward (exact)": (lambda a, b: torch.ops.aten.gelu_backward(b, a), (h, g)),
        "gelu (table)": (gelu_table.gelu_bf16, (h,)),
        "gelu backward (table)": (lambda a, b: gelu_table.gelu_bf16_backward(b, a), (h, g)),
    }
    result = {}
    for name, (fn, args) in ops.items():
        compiled = fn if "table" in name else torch.compile(fn)  # the table GELU is a custom op already
        ms = milliseconds(lambda compiled=compiled, args=args: compiled(*args))
        moved = (len(args) + 1) * h.numel() * h.element_size()
        result[name] = {"ms": ms, "tb_per_s": moved / ms / 1e9}
    return {"shape": [rows, cols], "dtype": "bfloat16", "ops": result}


def table_gelu_check() -> dict:
    """The table GELU kernels against `gelu_table`'s torch lookup: every bf16 input, 64 gradients each."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).repeat(64)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).bfloat16()

    def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
        return int((a.view(torch.int16) != b.view(torch.int16)).logical_and(~(a.isnan() & b.isnan())).sum())

    return {
        "inputs": x.numel(),
        "forward_mismatches": mismatches(gelu_table.gelu_bf16(x.cuda()).cpu(), gelu_table.gelu_lookup(x)),
        "backward_mismatches": mismatches(
            gelu_table.gelu_bf16_backward(dy.cuda(), x.cuda()).cpu(), gelu_table.gelu_bf16_backward(dy, x)
        ),
    }


def gemm_rates(k: int, n: int, rows: int) -> dict:
    """TFLOP/s of (rows, k) x (k, n) + bias and of its input gradient, through cuBLAS and cuBLASLt."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    tflop = 2 * rows * k * n / 1e12
    row = {}
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        row[f"{library} forward"] = tflop / milliseconds(lambda: F.linear(x, w, b)) * 1e3
        row[f"{library} input gradient"] = tflop / milliseconds(lambda: dy @ w) * 1e3
    torch.backends.cuda.preferred_blas_library("cublas")
    return row


def gemm_probe(rows: int = 256 * 197) -> dict:
    """The ViT-B / ViT-L products at batch 256 (qkv parts and proj, fc1, fc2), cuBLAS vs cuBLASLt."""
    shapes = [
        (k, n)
        for width, hidden in ((768, 3072), (1024, 4096))
        for k, n in ((width, width), (width, hidden), (hidden, width))
    ]
    return {"rows": rows, "tflop_per_s": {f"{k}->{n}": gemm_rates(k, n, rows) for k, n in shapes}}


def attention_times(heads: int, batch: int, tokens: int, head_dim: int, flex: Callable) -> dict:
    """ms of one attention layer's forward + backward per SDPA backend and FlexAttention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    g = torch.randn_like(q)

    def step(fn: Callable = F.scaled_dot_product_attention) -> None:
        torch.autograd.grad(fn(q, k, v), (q, k, v), g)

    row = {}
    for name in ("cudnn", "flash", "efficient"):
        with sdpa_kernel([getattr(SDPBackend, f"{name.upper()}_ATTENTION")]):
            row[name] = milliseconds(step)
    row["flex_attention"] = milliseconds(lambda: step(flex))
    return row


def attention_probe(batch: int = 256, tokens: int = 197, head_dim: int = 64) -> dict:
    """Attention of ViT-B (12 heads) and ViT-L (16) layers at batch 256."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    times = {f"{h} heads": attention_times(h, batch, tokens, head_dim, flex) for h in (12, 16)}
    return {"shape": [batch, "heads", tokens, head_dim], "forward_backward_ms": times}


def epilogue_times(width: int, hidden: int, rows: int) -> dict:
    """ms of the MLP's GELU with fc1 (forward) and its derivative with fc2's input gradient (backward).

    `cublas`: the step's kernels (cuBLAS product, then the table GELU kernel); `fused`: torch.compile
    with max-autotune over cuBLAS and inductor's persistent-TMA Triton templates, which can take the
    erf GELU into the product's epilogue (inductor benchmarks fused against unfused and keeps the
    faster); `fused_triton`: the templates alone, so the GELU is always in the epilogue.
    """
    x, dy = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w1 = (torch.randn(hidden, width, device="cuda") / width**0.5).bfloat16()
    b1 = (torch.randn(hidden, device="cuda") / 10).bfloat16()
    w2 = (torch.randn(width, hidden, device="cuda") / hidden**0.5).bfloat16()
    h = F.linear(x, w1, b1)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.linear(x, w1, b1)
        return pre, F.gelu(pre)

    def backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_backward(dy @ w2, h)

    row = {
        "cublas forward": milliseconds(lambda: gelu_table.gelu_bf16(F.linear(x, w1, b1))),
        "cublas backward": milliseconds(lambda: gelu_table.gelu_bf16_backward(dy @ w2, h)),
        "cublas product alone": milliseconds(lambda: F.linear(x, w1, b1)),
    }
    for name, backends in (("fused", "ATEN,TRITON"), ("fused_triton", "TRITON")):
        options = {"max_autotune": True, "max_autotune_gemm_backends": backends}
        options["triton.enable_persistent_tma_matmul"] = True
        for direction, fn, args in (("forward", forward, (x,)), ("backward", backward, (dy, h))):
            torch._dynamo.reset()
            compiled = torch.compile(fn, options=options)
            row[f"{name} {direction}"] = milliseconds(lambda compiled=compiled, args=args: compiled(*args))
    return row


def epilogue_probe(rows: int = 256 * 197) -> dict:
    """The MLPs of ViT-B and ViT-L at batch 256: GELU in the GEMM's epilogue or as its own kernel."""
    shapes = ((768, 3072), (1024, 4096))
    return {"rows": rows, "ms": {f"{w}->{h}": epilogue_times(w, h, rows) for w, h in shapes}}


PARTS = ("crops", "pointwise", "table_gelu", "gemm", "attention", "epilogue")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    if not torch.cuda.is_available():
        print("kernel_probes.py measures GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "hardware": torch.cuda.get_device_name(),
        "environment": environment(),
    }
    probes: dict[str, Callable[[], object]] = {
        "crops": lambda: crop_probe(batch=256, sources=2048, side=448, out=224),
        "pointwise": lambda: [pointwise_probe(rows=256 * 197, cols=cols) for cols in (3072, 4096)],
        "table_gelu": table_gelu_check,
        "gemm": gemm_probe,
        "attention": attention_probe,
        "epilogue": epilogue_probe,
    }
    for part in parts:
        report[part] = probes[part]()
    print_report(report)
    if args.out:
        write_json(args.out, report)
    return 0


def joined(row: dict[str, float], digits: int) -> str:
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in row.items())


def print_report(report: dict) -> None:
    """One line per measurement of the parts that ran."""
    if "crops" in report:
        crops = report["crops"]
        print(
            f"crops {crops['shape']}: kernel {crops['kernel_ms']:.3f} ms, "
            f"roi_align path {crops['roi_align_path_ms']:.3f} ms, max abs diff {crops['max_abs_diff']:.3g}, "
            f"host sync: {crops['host_sync'] or 'none'}"
        )
    for probe in report.get("pointwise", []):
        print("pointwise, bf16", probe["shape"])
        for name, row in probe["ops"].items():
            print(f"  {name:<24} {row['ms']:.3f} ms  {row['tb_per_s']:.2f} TB/s")
    if "table_gelu" in report:
        print("table GELU kernels vs torch lookup:", report["table_gelu"])
    for shape, row in report.get("gemm", {}).get("tflop_per_s", {}).items():
        print(f"GEMM {report['gemm']['rows']} x {shape}: {joined(row, 0)} TFLOP/s")
    for heads, row in report.get("attention", {}).get("forward_backward_ms", {}).items():
        print(f"attention forward + backward, {heads}: {joined(row, 3)} ms")
    for shape, row in report.get("epilogue", {}).get("ms", {}).items():
        print(f"MLP {report['epilogue']['rows']} x {shape}: {joined(row, 3)} ms")


if __name__ == "__main__":
    sys.exit(main())
