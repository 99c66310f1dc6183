"""Two probes behind issue 7's profile, on one GPU: the crop kernel against the roi_align path, and the
memory rate of inductor's pointwise kernels (exact GELU and its derivative against plain copies).

A pointwise kernel that reads and writes bf16 is limited by memory unless its arithmetic is costly;
the probe shows which of the GELU kernels in a ViT step are (their shape: ViT-B/16's MLP at batch 256).

    python benchmarks/kernel_probes.py --out benchmarks/results/kernel_probes_h200.json   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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

    return {
        "shape": [batch, 3, out, out],
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
    }
    result = {}
    for name, (fn, args) in ops.items():
        compiled = torch.compile(fn)
        ms = milliseconds(lambda compiled=compiled, args=args: compiled(*args))
        moved = (len(args) + 1) * h.numel() * h.element_size()
        result[name] = {"ms": ms, "tb_per_s": moved / ms / 1e9}
    return {"shape": [rows, cols], "dtype": "bfloat16", "ops": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_probes.py measures GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "hardware": torch.cuda.get_device_name(),
        "environment": environment(),
        "crops": crop_probe(batch=256, sources=2048, side=448, out=224),
        "pointwise": pointwise_probe(rows=256 * 197, cols=3072),
    }
    crops = report["crops"]
    print(
        f"crops {crops['shape']}: kernel {crops['kernel_ms']:.3f} ms, "
        f"roi_align path {crops['roi_align_path_ms']:.3f} ms, max abs diff {crops['max_abs_diff']:.3g}"
    )
    for name, row in report["pointwise"]["ops"].items():
        print(f"{name:<24} {row['ms']:.3f} ms  {row['tb_per_s']:.2f} TB/s")
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
