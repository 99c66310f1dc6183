"""What a sweep costs: 4 fractions x 3 seeds of `cyclic` (K=2) with the lambda grid, one by one vs batched.

(a) one by one: each run trained alone (loop.run_phase per phase), then its lambda grid scored one
    lambda at a time;
(b) batched: all 12 runs in one multirun.train_runs call, then the 12 x 13 rescaled models scored
    together (multirun.run_logits, one pass per validation chunk);
(c) reference: one `ln` run on 100 % of the data, of the same length and batch size, with its 13
    rescaled models scored the same batched way.
Every run gets the same step budget (--steps) and per-run batch (--batch-size). The target is
(b) <= 3 x (c). Training and the grid are timed separately; the ratios use their sum.

    python benchmarks/sweep_cost.py --model vit_base_patch16_224 --steps 200 --device cuda
    python benchmarks/sweep_cost.py --smoke    # tiny model on the CPU, seconds (CI)

Data: --data DIR (ImageFolder classes) or a synthetic set of smooth random images tinted by a class
colour. Images live on the device as uint8; batches are drawn, flipped and normalised there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lnshift.backbones import load_backbone
from lnshift.config import FitConfig, environment
from lnshift.data import open_source
from lnshift.evaluate import autocast, resolve_device
from lnshift.fit import build_model
from lnshift.lambdas import DEFAULT_GRID, choose
from lnshift.loop import restore
from lnshift.multirun import initial_states, norms_of, run_logits, train_alone, train_runs
from lnshift.shift import rescale

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)
TINY = {"img_size": 32, "patch_size": 8}
SMOKE = {"model": "lnshift/test-vit", "steps": 8, "batch_size": 4, "images": 256, "val": 16, "device": "cpu"}


@dataclass
class Images:
    """A labelled image set on the device (uint8) and the model's normalisation."""

    x: Tensor
    y: Tensor
    mean: Tensor
    std: Tensor

    def batch(self, idx: Tensor, flip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images `idx` as normalised floats, horizontally flipped where `flip`."""
        idx = idx.to(self.x.device)
        x = self.x[idx].float() / 255
        if flip is not None:
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return (x - self.mean) / self.std, self.y[idx]


def synthetic(n: int, size: int, classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Smooth random images (upsampled 4 x 4 noise) half tinted by their class's colour."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(classes, (n,), generator=gen)
    colour = torch.rand(classes, 3, 1, 1, generator=gen)
    noise = torch.rand(n, 3, 4, 4, generator=gen)
    chunks = []
    for i in range(0, n, 512):
        smooth = F.interpolate(noise[i : i + 512].to(device), size=(size, size), mode="bilinear")
        chunks.append(((0.5 * smooth + 0.5 * colour[y[i : i + 512]].to(device)) * 255).to(torch.uint8))
    return torch.cat(chunks), y.to(device)


def folder(path: str, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """An ImageFolder tree, every image resized to size x size."""
    source = open_source(path)
    index = {c: i for i, c in enumerate(source.classes)}
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0)).tolist()
    x = [torch.from_numpy(np.asarray(source.load(i).resize((size, size)))).permute(2, 0, 1) for i in order]
    y = [index[source.samples[i].label] for i in order]
    return torch.stack(x).to(device), torch.tensor(y, device=device)


def chunks(images: Images, first: int, n: int, size: int) -> list[tuple[Tensor, Tensor]]:
    """Images first .. first + n as batches of `size` (the validation images, unflipped)."""
    return [images.batch(torch.arange(first + i, first + min(i + size, n))) for i in range(0, n, size)]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def stream(images: Images, pool: Tensor, run: int, batch_size: int) -> Callable[[int], tuple[Tensor, Tensor]]:
    """Run `run`'s batch at each step: seeded draws from its pool, each image flipped with probability 1/2."""

    def batch(step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(run * 1_000_003 + step)
        idx = pool[torch.randint(len(pool), (batch_size,), generator=gen)]
        return images.batch(idx, torch.rand(batch_size, generator=gen) < 0.5)

    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lnshift/vit-tiny-cifar10", help="timm name (random init) or lnshift name")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps of every run")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of every run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--data", help="ImageFolder directory (default: synthetic images)")
    ap.add_argument("--images", type=int, default=10_000, help="synthetic images (training pool + validation)")
    ap.add_argument("--classes", type=int, default=10, help="synthetic classes")
    ap.add_argument("--val", type=int, default=500, help="validation images that score the lambda grid")
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--out", help="write the figures to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps (CI)")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE, precision="fp32")
    device = resolve_device(args.device)
    kwargs = TINY if args.model == "lnshift/test-vit" else {}
    backbone = load_backbone(args.model, pretrained=args.model.startswith("lnshift/"), model_kwargs=kwargs).to(device)
    size = backbone.data_config["input_size"][-1]
    x, y = folder(args.data, size, device) if args.data else synthetic(args.images, size, args.classes, device)
    stats = {k: torch.tensor(backbone.data_config[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std")}
    images = Images(x, y, stats["mean"], stats["std"])
    classes = int(y.max()) + 1
    n_train = len(y) - args.val
    val = chunks(images, n_train, args.val, args.eval_batch_size)
    val_grid = chunks(images, n_train, args.val, max(1, args.eval_batch_size // len(DEFAULT_GRID)))

    common = {"model": args.model, "model_kwargs": kwargs, "steps": args.steps, "batch_size": args.batch_size}
    cfg = FitConfig(**common, method="cyclic", cycles=2, precision=args.precision)
    cfg_ln = replace(cfg, method="ln")
    model = build_model(cfg, backbone, classes).to(device)
    runs = [(frac, seed) for frac in FRACTIONS for seed in SEEDS]
    pools = []
    for frac, seed in runs:  # nested subsets: a seed's smaller fractions are prefixes of its larger ones
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        pools.append(order[: max(1, int(frac * n_train))])
    batches = [stream(images, pool, r, args.batch_size) for r, pool in enumerate(pools)]
    starts = [{k: v.to(device) for k, v in s.items()} for s in initial_states(cfg, backbone, classes, SEEDS)]
    starts = [starts[SEEDS.index(seed)] for _, seed in runs]
    start_ln = {k: v.to(device) for k, v in initial_states(cfg_ln, backbone, classes, [0])[0].items()}
    norms = norms_of(list(starts[0]))

    def accuracy(logits: Tensor, labels: Tensor) -> float:
        return float((logits.argmax(-1) == labels).float().mean())

    def grid_one_by_one(base: dict, tuned: dict) -> float:
        """The lambda grid scored one rescaled model at a time; returns the chosen lambda."""
        scores = []
        for lam in DEFAULT_GRID:
            restore(model, rescale(base, tuned, norms, lam))
            with torch.inference_mode(), autocast(device, args.precision):
                logits = torch.cat([model(xb).float() for xb, _ in val])
            scores.append({"accuracy": accuracy(logits, torch.cat([yb for _, yb in val]))})
        return choose(DEFAULT_GRID, scores)

    def grids_batched(bases: list[dict], tuned: list[dict]) -> list[float]:
        """Every run's whole lambda grid in one batched pass per validation chunk; returns the chosen lambdas."""
        states = [rescale(b, t, norms, lam) for b, t in zip(bases, tuned, strict=True) for lam in DEFAULT_GRID]
        logits = torch.cat([run_logits(model, states, xb, device, args.precision) for xb, _ in val_grid], dim=1)
        labels = torch.cat([yb for _, yb in val_grid])
        scores = [{"accuracy": accuracy(lk, labels)} for lk in logits]
        n = len(DEFAULT_GRID)
        return [choose(DEFAULT_GRID, scores[i : i + n]) for i in range(0, len(scores), n)]

    def one_by_one(steps: int) -> list[dict]:
        short = replace(cfg, steps=steps)
        return [train_alone(model, s, b, short, device) for s, b in zip(starts, batches, strict=True)]

    def batched(steps: int) -> list[dict]:
        def pairs(step: int) -> list[tuple[Tensor, Tensor]]:
            return [b(step) for b in batches]

        return train_runs(model, starts, pairs, replace(cfg, steps=steps), device)

    def reference(steps: int) -> dict:
        full = stream(images, torch.arange(n_train), 0, args.batch_size)
        return train_alone(model, start_ln, full, replace(cfg_ln, steps=steps), device)

    for warm in (one_by_one, batched, reference):  # kernels, autotuning and allocator caches before timing
        warm(8)
    trained_a, train_a = timed(lambda: one_by_one(args.steps), device)
    _, grid_a = timed(lambda: [grid_one_by_one(s, t) for s, t in zip(starts, trained_a, strict=True)], device)
    trained_b, train_b = timed(lambda: batched(args.steps), device)
    _, grid_b = timed(lambda: grids_batched(starts, trained_b), device)
    trained_c, train_c = timed(lambda: reference(args.steps), device)
    _, grid_c = timed(lambda: grids_batched([start_ln], [trained_c]), device)
    norm_keys = [k for k in trained_a[0] if not k.startswith("head.")]
    diff = max(float((trained_a[0][k] - trained_b[0][k]).abs().max()) for k in norm_keys)

    seconds = {"a": (train_a, grid_a), "b": (train_b, grid_b), "c": (train_c, grid_c)}
    total = {k: sum(v) for k, v in seconds.items()}
    ratio_a, ratio_b = total["a"] / total["c"], total["b"] / total["c"]
    print(
        f"sweep: {len(runs)} runs (fractions {', '.join(map(str, FRACTIONS))} x seeds {', '.join(map(str, SEEDS))}) "
        f"of cyclic K=2 and {len(DEFAULT_GRID)} lambdas on {args.val} validation images | {args.model} | "
        f"{args.steps} steps x batch {args.batch_size} per run | {device} {args.precision}"
    )
    print(f"{'':28}{'train s':>10}{'lambda grid s':>15}{'total s':>10}{'/ (c)':>8}")
    labels = {"a": "(a) one by one", "b": "(b) batched", "c": "(c) one 100 % ln run"}
    for key, label in labels.items():
        train, grid = seconds[key]
        print(f"{label:28}{train:10.2f}{grid:15.2f}{total[key]:10.2f}{total[key] / total['c']:8.2f}")
    met = "met" if ratio_b <= 3 else "NOT met"
    print(f"(a) / (c) = {ratio_a:.2f}   (b) / (c) = {ratio_b:.2f}   target (b) <= 3 x (c): {met}")
    print(f"training only: (a) / (c) = {train_a / train_c:.2f}   (b) / (c) = {train_b / train_c:.2f}")
    print(f"max |batched - one by one| of run 0's LayerNorm values: {diff:.2e}")
    if args.out:
        record = {
            "args": vars(args),
            "environment": environment(),
            "seconds": {k: {"train": v[0], "lambda_grid": v[1], "total": total[k]} for k, v in seconds.items()},
            "ratio_a_c": ratio_a,
            "ratio_b_c": ratio_b,
            "target_met": ratio_b <= 3,
            "max_abs_diff_layernorm_run0": diff,
        }
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
