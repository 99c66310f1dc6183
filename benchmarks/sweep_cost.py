"""What a sweep costs: 4 fractions x 3 seeds of `cyclic` (K=2) with the lambda grid, one by one vs batched;
and (`--study lr-grid`, issue 21) a learning-rate grid x 3 seeds of `ln` in one batched pass vs one run.

(a) one by one: each run trained alone (loop.run_phase per phase), then its lambda grid scored one
    lambda at a time;
(b) batched: the runs of equal length in one batched.train_runs call each (all 12 at once when every
    run has the same steps), then the 12 x 13 rescaled models scored together (batched.run_logits,
    one pass per validation chunk);
(c) reference: one `ln` run on 100 % of the data, of the same length and batch size, with its 13
    rescaled models scored the same batched way.
The target is (b) <= 3 x (c). Training and the grid are timed separately; the ratios use their sum.
Issue 7 does not say what "the same length" is for runs on different fractions, so both readings:
- `--length steps` (default): every run, (c) included, takes --steps optimiser steps;
- `--length epochs`: every run takes --epochs passes over its own training images, so a 2 % run
  is 1/50 as long as (c).
Every run has the same per-run batch (--batch-size); --fractions gives the 4 data fractions.

    python benchmarks/sweep_cost.py --model vit_base_patch16_224 --steps 200 --device cuda
    python benchmarks/sweep_cost.py --model vit_base_patch16_224 --length epochs --epochs 2 --fractions 0.02,0.05,0.1,1
    python benchmarks/sweep_cost.py --smoke    # tiny model on the CPU, seconds (CI)

`--study lr-grid`: `ln` at each of --lrs (5 values) x 3 seeds, every run on all training images for
--steps steps, trained in one batched.train_runs call (a learning rate per run), against one such run
alone (batched.train_alone, loop.run_phase) in the same process. Prints both times, their ratio
(target for the bundled model: <= 2), images/s and TFLOP/s of both (torch's FLOP counter on one
training step of the whole model, per image) and their share of --peak-tflops (target on ViT-B/16
for the batched grid: >= 45 %).

    python benchmarks/sweep_cost.py --study lr-grid --steps 300 --batch-size 64 --device cuda
    python benchmarks/sweep_cost.py --study lr-grid --model vit_base_patch16_224 --steps 30 --batch-size 32

Data: --data DIR (ImageFolder classes) or a synthetic set of smooth random images tinted by a class
colour. Images live on the device as uint8; batches are drawn, flipped and normalised there.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lnshift.analyses.shift import rescale
from lnshift.backbones import load_backbone, resolve_fast_paths
from lnshift.config import FitConfig, environment
from lnshift.data import open_source
from lnshift.rundir import write_json
from lnshift.training.batched import initial_states, norms_of, run_logits, train_alone, train_runs
from lnshift.training.evaluate import autocast, resolve_device
from lnshift.training.ingredients import build_model
from lnshift.training.lambdas import DEFAULT_GRID, choose
from lnshift.training.loop import restore, set_trainable
from lnshift.training.multirun import runs_by_length
from lnshift.training.phases import phases_for

FRACTIONS = "0.25,0.5,0.75,1"
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


def fractions(text: str) -> list[float]:
    """--fractions: comma-separated, each in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every fraction must be in (0, 1]")
    return values


def run_steps(length: str, steps: int, epochs: float, images: int, batch_size: int) -> int:
    """Optimiser steps of a run on `images` training images: --steps, or --epochs passes over them."""
    return steps if length == "steps" else max(1, math.ceil(epochs * images / batch_size))


def step_flops(model: nn.Module, names: list[str], x: Tensor, device: torch.device, precision: str) -> int:
    """FLOPs of one training step of one run (forward and backward of the whole model) on the batch `x`."""
    set_trainable(model, names)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            logits = model(x)
        nn.functional.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long, device=device)).backward()
    set_trainable(model, [])
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def lr_grid(args: argparse.Namespace, backbone: nn.Module, images: Images, n_train: int, device: torch.device) -> None:
    """--study lr-grid: --lrs x SEEDS runs of `ln` in one batched pass against one run alone."""
    classes = int(images.y.max()) + 1
    kwargs = TINY if args.model == "lnshift/test-vit" else {}
    cfg = FitConfig.from_dict({
        "model": args.model, "model_kwargs": kwargs, "steps": args.steps, "batch_size": args.batch_size,
        "method": "ln", "precision": args.precision,
    })  # fmt: skip
    model = build_model(cfg, backbone, classes).to(device)
    runs = [(lr, seed) for lr in args.lrs for seed in SEEDS]
    by_seed = [{k: v.to(device) for k, v in s.items()} for s in initial_states(cfg, backbone, classes, SEEDS)]
    starts = [by_seed[SEEDS.index(seed)] for _, seed in runs]
    # as fit: a run's data order depends on its seed only, so the learning rates of a seed see the same batches
    batches = [stream(images, torch.arange(n_train), SEEDS.index(seed), args.batch_size) for _, seed in runs]
    lrs = [lr for lr, _ in runs]

    def grid(steps: int) -> list[dict]:
        return train_runs(model, starts, lambda step: [b(step) for b in batches], cfg.replace(steps=steps), device, lrs)

    def one(steps: int) -> dict:
        return train_alone(model, starts[0], batches[0], cfg.replace(steps=steps, lr=lrs[0]), device)

    grid(8), one(8)  # kernels and allocator caches, with the timed runs' batch shapes
    tuned, t_grid = timed(lambda: grid(args.steps), device)
    alone, t_one = timed(lambda: one(args.steps), device)
    x, _ = batches[0](0)
    flops = step_flops(model, list(starts[0]), x, device, args.precision) / len(x)  # per image
    images_grid, images_one = len(runs) * args.steps * args.batch_size, args.steps * args.batch_size
    rate = {"grid": images_grid / t_grid, "one": images_one / t_one}
    tflops = {k: v * flops / 1e12 for k, v in rate.items()}
    diff = max(float((tuned[0][k] - alone[k]).abs().max()) for k in alone)
    print(
        f"lr grid: {len(args.lrs)} learning rates ({', '.join(f'{v:g}' for v in args.lrs)}) x seeds "
        f"{', '.join(map(str, SEEDS))} of ln | {args.model} | {args.steps} steps x batch {args.batch_size} per run | "
        f"{device} {args.precision} | {flops / 1e9:.2f} GFLOP per image and step"
    )
    print(f"{'':30}{'s':>8}{'img/s':>10}{'TFLOP/s':>9}{'of peak':>9}")
    for key, label, seconds in (("grid", f"(g) {len(runs)} runs batched", t_grid), ("one", "(1) one run", t_one)):
        share = tflops[key] / args.peak_tflops
        print(f"{label:30}{seconds:8.2f}{rate[key]:10.0f}{tflops[key]:9.1f}{share:9.1%}")
    print(f"(g) / (1) = {t_grid / t_one:.2f} (target <= 2 for the bundled model)")
    print(f"max |batched - alone| of run 0's tensors: {diff:.2e}")
    if args.out:
        record = {
            "study": "lr-grid",
            "args": vars(args),
            "environment": environment(),
            "runs": len(runs),
            "seconds": {"grid": t_grid, "one": t_one},
            "ratio": t_grid / t_one,
            "images_per_s": rate,
            "gflop_per_image": flops / 1e9,
            "tflops": tflops,
            "of_peak": {k: v / args.peak_tflops for k, v in tflops.items()},
            "max_abs_diff_run0": diff,
        }
        write_json(Path(args.out), record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lnshift/vit-tiny-cifar10", help="timm name (random init) or lnshift name")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps of every run (--length steps)")
    ap.add_argument("--length", choices=["steps", "epochs"], default="steps", help="what 'the same length' is")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over its own images per run (--length epochs)")
    ap.add_argument("--fractions", type=fractions, default=FRACTIONS, help=f"data fractions (default {FRACTIONS})")
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
    ap.add_argument("--study", choices=["lambda-sweep", "lr-grid"], default="lambda-sweep", help="what to time")
    ap.add_argument("--lrs", type=fractions, default="0.003,0.01,0.03,0.1,0.3", help="--study lr-grid: the grid")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="the FLOP ceiling (H200 dense bf16)")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE, precision="fp32")
    device = resolve_device(args.device)
    kwargs = TINY if args.model == "lnshift/test-vit" else {}
    fast_paths = resolve_fast_paths("auto", device, training=True)  # what `lnshift fit` trains with here
    pretrained = args.model.startswith("lnshift/")
    backbone = load_backbone(args.model, pretrained=pretrained, model_kwargs=kwargs, fast_paths=fast_paths).to(device)
    size = backbone.data_config["input_size"][-1]
    x, y = folder(args.data, size, device) if args.data else synthetic(args.images, size, args.classes, device)
    stats = {k: torch.tensor(backbone.data_config[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std")}
    images = Images(x, y, stats["mean"], stats["std"])
    classes = int(y.max()) + 1
    n_train = len(y) - args.val
    if args.study == "lr-grid":
        return lr_grid(args, backbone, images, n_train, device)
    val = chunks(images, n_train, args.val, args.eval_batch_size)
    val_grid = chunks(images, n_train, args.val, max(1, args.eval_batch_size // len(DEFAULT_GRID)))

    common = {"model": args.model, "model_kwargs": kwargs, "steps": args.steps, "batch_size": args.batch_size}
    cfg = FitConfig.from_dict({**common, "method": "cyclic", "cycles": 2, "precision": args.precision})
    cfg_ln = cfg.replace(method="ln")
    model = build_model(cfg, backbone, classes).to(device)
    runs = [(frac, seed) for frac in args.fractions for seed in SEEDS]
    pools = []
    for frac, seed in runs:  # nested subsets: a seed's smaller fractions are prefixes of its larger ones
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        pools.append(order[: max(1, int(frac * n_train))])
    steps = [run_steps(args.length, args.steps, args.epochs, len(pool), args.batch_size) for pool in pools]
    steps_c = run_steps(args.length, args.steps, args.epochs, n_train, args.batch_size)
    phases = len(phases_for(cfg.method.name, cfg.method.cycles))
    too_short = sorted({frac for (frac, _), n in zip(runs, steps, strict=True) if n < phases})
    if too_short:
        ap.error(
            f"the runs on fraction(s) {', '.join(map(str, too_short))} get fewer steps than cyclic's {phases} "
            f"phases: raise --{args.length}, --images or the fraction"
        )
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

    def one_by_one(steps: list[int]) -> list[dict]:
        return [
            train_alone(model, s, b, cfg.replace(steps=n), device)
            for s, b, n in zip(starts, batches, steps, strict=True)
        ]

    def batched(steps: list[int]) -> list[dict]:
        """The runs of each length trained together, shortest first; the states in the runs' order."""
        trained: dict[int, dict] = {}
        for n, group in runs_by_length(steps).items():

            def pairs(step: int, group: list[int] = group) -> list[tuple[Tensor, Tensor]]:
                return [batches[r](step) for r in group]

            tuned = train_runs(model, [starts[r] for r in group], pairs, cfg.replace(steps=n), device)
            trained.update(zip(group, tuned, strict=True))
        return [trained[r] for r in range(len(runs))]

    def reference(steps: int) -> dict:
        full = stream(images, torch.arange(n_train), 0, args.batch_size)
        return train_alone(model, start_ln, full, cfg_ln.replace(steps=steps), device)

    # kernels, autotuning and allocator caches before timing, with the timed runs' batch shapes:
    # distinct lengths stay distinct, so the batched warm-up trains the same groups of runs
    short = {n: 8 + i for i, n in enumerate(sorted(set(steps)))}
    one_by_one([8] * len(runs))
    batched([short[n] for n in steps])
    reference(8)
    trained_a, train_a = timed(lambda: one_by_one(steps), device)
    _, grid_a = timed(lambda: [grid_one_by_one(s, t) for s, t in zip(starts, trained_a, strict=True)], device)
    trained_b, train_b = timed(lambda: batched(steps), device)
    _, grid_b = timed(lambda: grids_batched(starts, trained_b), device)
    trained_c, train_c = timed(lambda: reference(steps_c), device)
    _, grid_c = timed(lambda: grids_batched([start_ln], [trained_c]), device)
    norm_keys = [k for k in trained_a[0] if not k.startswith("head.")]
    diff = max(float((trained_a[0][k] - trained_b[0][k]).abs().max()) for k in norm_keys)

    seconds = {"a": (train_a, grid_a), "b": (train_b, grid_b), "c": (train_c, grid_c)}
    total = {k: sum(v) for k, v in seconds.items()}
    ratio_a, ratio_b = total["a"] / total["c"], total["b"] / total["c"]
    length = f"{args.steps} steps" if args.length == "steps" else f"{args.epochs:g} epochs of its own images"
    fracs, seeds = ", ".join(map(str, args.fractions)), ", ".join(map(str, SEEDS))
    print(
        f"sweep: {len(runs)} runs (fractions {fracs} x seeds {seeds}) "
        f"of cyclic K=2 and {len(DEFAULT_GRID)} lambdas on {args.val} validation images | {args.model} | "
        f"{length} x batch {args.batch_size} per run (steps {sorted(set(steps))}; (c) {steps_c}) | "
        f"{device} {args.precision}"
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
            "steps_per_run": steps,
            "steps_c": steps_c,
            "seconds": {k: {"train": v[0], "lambda_grid": v[1], "total": total[k]} for k, v in seconds.items()},
            "ratio_a_c": ratio_a,
            "ratio_b_c": ratio_b,
            "target_met": ratio_b <= 3,
            "max_abs_diff_layernorm_run0": diff,
        }
        write_json(Path(args.out), record)


if __name__ == "__main__":
    main()
