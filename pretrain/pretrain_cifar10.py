"""Pretrain lnshift's built-in foundation model: a 6-block ViT-Tiny (patch 4, 32 px) on CIFAR-10 train.

lnshift cannot download pretrained weights, so it ships this compact backbone. Supervised training
on the 50,000 CIFAR-10 training images (never PACS or LC25000) with heavy augmentation gives
LayerNorm-rich features that transfer; pretrain/README.md has the recipe and its justification.

Everything runs on the GPU: the JPEGs are decoded once into a uint8 tensor that stays on the
device, augmentation (random crop + flip, a RandAugment-style op set, mixup/cutmix) works on
batched tensors, and the model runs under bf16 autocast, compiled. `--epochs 0` sizes the run to
`--time-budget` from a short timed calibration, then trains from the same seeded start; rerun
with `--epochs N` (the recorded N) to repeat a run.

    python pretrain/prepare_data.py          # once: .data/cifar10_pack.npz (20 MiB, lossless)
    python pretrain/pretrain_cifar10.py      # GPU; writes the weights and pretrain/results.json
    python pretrain/pretrain_cifar10.py --device cpu --epochs 1 --limit 512 --batch-size 64  # smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.optim
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_data import DEFAULT_PACK, DEFAULT_ZIP, content_sha256, read_entries

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224"
# Architecture only (no training-time options): lnshift rebuilds the backbone with
# timm.create_model(ARCH, pretrained=False, num_classes=0, **MODEL_KWARGS).
MODEL_KWARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
    "mlp_ratio": 4.0,
    "class_token": False,
    "global_pool": "avg",
}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMG = 32


@dataclass
class Recipe:
    """Every training choice; recorded verbatim in the weights' metadata."""

    seed: int = 0
    epochs: int = 0  # 0: pick from time_budget_s after a timed calibration
    time_budget_s: float = 390.0
    max_epochs: int = 1000
    batch_size: int = 500  # divides 50,000: every image is seen once per epoch
    lr: float = 2e-3  # sqrt-scaled from the common 1e-3 at batch 128 for ViTs on CIFAR
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    drop_path_rate: float = 0.1
    label_smoothing: float = 0.1
    crop_padding: int = 4
    randaug_ops: int = 2
    randaug_magnitude: float = 0.9  # timm's m9 on its 0..10 scale
    randaug_mstd: float = 0.05  # timm's mstd0.5
    randaug_prob: float = 0.5
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    eval_points: int = 10


# --------------------------------------------------------------------------------------- data


def decode(files: list[bytes]) -> np.ndarray:
    """JPEG bytes -> uint8 (N, 32, 32, 3) with Pillow, as lnshift decodes images downstream."""
    return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files])


def decode_all(files: list[bytes], workers: int) -> np.ndarray:
    """Decode in worker processes (forked before CUDA starts); ~9 s on one core, ~1 s on 16."""
    if workers <= 1:
        return decode(files)
    chunks = [files[i : i + 2000] for i in range(0, len(files), 2000)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return np.concatenate(pool.map(decode, chunks))


@dataclass
class Cifar:
    """CIFAR-10 as uint8 NCHW tensors plus the digest of the JPEG files they came from."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    content_sha256: str
    source_zip_sha256: str | None


def load_cifar(path: Path, limit: int, workers: int) -> Cifar:
    """Read the zip or pack, check its digest, decode every image once."""
    names, files = read_entries(path)
    digest = content_sha256(names, files)
    zip_sha = None
    if path.suffix != ".zip":
        with np.load(path, allow_pickle=False) as pack:
            zip_sha = str(pack["source_zip_sha256"])
    print(f"data: {path} ({len(files)} JPEGs), content sha256 {digest}, source zip sha256 {zip_sha}")
    split = np.array([name.split("/")[1] for name in names])
    labels = torch.tensor([CLASSES.index(name.split("/")[2]) for name in names])
    parts = []
    for which in ("train", "test"):
        idx = np.flatnonzero(split == which)
        if limit:  # evenly spaced subset for smoke tests; covers every class
            idx = idx[np.linspace(0, len(idx) - 1, min(limit, len(idx))).astype(np.int64)]
        images = decode_all([files[i] for i in idx], workers)
        parts += [torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels[idx]]
    return Cifar(*parts, content_sha256=digest, source_zip_sha256=zip_sha)


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 images on the 0..1 scale (from histograms), rounded."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(3):
        hist = torch.bincount(x[:, c].flatten().cpu(), minlength=256).double()
        m = (hist * values).sum() / hist.sum()
        mean.append(round(m.item(), 4))
        std.append(round(((hist * (values - m) ** 2).sum() / hist.sum()).sqrt().item(), 4))
    return mean, std


# ------------------------------------------------------------------------------- augmentation
# RandAugment (timm's rand-m9-mstd0.5-inc1 op set, minus equalize and invert) on batched GPU
# tensors. Random numbers are drawn eagerly from a seeded generator (`sample_aug`); the pixel work
# is a pure function of them (`apply_aug`) so torch.compile can fuse it.

COLOR_OPS = ("autocontrast", "posterize", "solarize", "color", "contrast", "brightness", "sharpness")
GEOM_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS = COLOR_OPS + GEOM_OPS
OP = {name: k for k, name in enumerate(OPS)}


def sample_aug(n: int, recipe: Recipe, gen: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """Per-image random draws: which RandAugment ops, their signed levels, crop shift, flip."""

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    chosen = rand(n, len(OPS)).argsort(dim=1)[:, : recipe.randaug_ops]  # distinct ops per image
    active = torch.zeros(n, len(OPS), dtype=torch.bool, device=device).scatter_(1, chosen, True)
    active &= rand(n, len(OPS)) < recipe.randaug_prob
    noise = torch.randn(n, len(OPS), generator=gen, device=device) * recipe.randaug_mstd
    level = (recipe.randaug_magnitude + noise).clamp(0, 1) * active
    sign = torch.where(rand(n, len(OPS)) < 0.5, -1.0, 1.0)
    pad = recipe.crop_padding
    shift = torch.randint(-pad, pad + 1, (n, 2), generator=gen, device=device).float()
    flip = rand(n) < 0.5
    return {"active": active, "level": level, "signed": level * sign, "shift": shift, "flip": flip}


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def apply_aug(x_u8: Tensor, p: dict[str, Tensor], mean: Tensor, std: Tensor) -> Tensor:
    """uint8 batch -> augmented, normalised float batch (pure function of the draws in `p`)."""
    x = x_u8.float() / 255
    on = p["active"].view(*p["active"].shape, 1, 1, 1)
    level, signed = p["level"], p["signed"]

    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    stretched = torch.where(hi - lo > 1e-3, (x - lo) / (hi - lo).clamp_min(1e-3), x)
    x = torch.where(on[:, OP["autocontrast"]], stretched, x)
    bits = (4 - (level[:, OP["posterize"]] * 4).floor()).clamp(1, 4)
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1)
    x = torch.where(on[:, OP["posterize"]], (x * 255 / step).floor() * step / 255, x)
    threshold = (1 - level[:, OP["solarize"]]).view(-1, 1, 1, 1)
    x = torch.where(on[:, OP["solarize"]] & (x >= threshold), 1 - x, x)
    x = _blend(x, _gray(x), 1 + 0.9 * signed[:, OP["color"]])
    x = _blend(x, _gray(x).mean((2, 3), keepdim=True), 1 + 0.9 * signed[:, OP["contrast"]])
    x = _blend(x, torch.zeros_like(x), 1 + 0.9 * signed[:, OP["brightness"]])
    kernel = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]).div(13).expand(3, 1, 3, 3)
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = _blend(x, smooth, 1 + 0.9 * signed[:, OP["sharpness"]])

    # One warp for every geometric op + the padded random crop + the flip. theta maps output to
    # input coordinates on the [-1, 1] grid; with only integer shifts and flips it samples exact
    # pixels. Pixels from outside the image take the mean colour (0 after normalisation).
    angle = signed[:, OP["rotate"]] * math.radians(30)
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    rotate = torch.stack([cos, -sin, sin, cos], 1).view(-1, 2, 2)
    shear_x = torch.stack([one, 0.3 * signed[:, OP["shear_x"]], zero, one], 1).view(-1, 2, 2)
    shear_y = torch.stack([one, zero, 0.3 * signed[:, OP["shear_y"]], one], 1).view(-1, 2, 2)
    flip = torch.stack([torch.where(p["flip"], -1.0, 1.0), zero, zero, one], 1).view(-1, 2, 2)
    linear = flip @ rotate @ shear_x @ shear_y
    translate = 0.3 * 2 * torch.stack([signed[:, OP["translate_x"]], signed[:, OP["translate_y"]]], 1)
    offset = translate + p["shift"] * 2 / IMG
    theta = torch.cat([linear, offset.unsqueeze(2)], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    m = mean.view(1, 3, 1, 1)
    x = F.grid_sample(x - m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x / std.view(1, 3, 1, 1)


def normalize(x_u8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x_u8.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def mix(x: Tensor, target: Tensor, recipe: Recipe, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """timm-style batch mixup / cutmix, pairing each image with its mirror in the batch."""
    if rng.random() >= recipe.mixup_prob:
        return x, target
    if rng.random() < recipe.mixup_switch_prob:  # cutmix
        lam = float(rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha))
        cut = math.sqrt(1 - lam)
        ch, cw = int(IMG * cut), int(IMG * cut)
        cy, cx = int(rng.integers(IMG)), int(rng.integers(IMG))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, IMG)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, IMG)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / IMG**2
    else:
        lam = float(rng.beta(recipe.mixup_alpha, recipe.mixup_alpha))
        x = x * lam + x.flip(0) * (1 - lam)
    return x, target * lam + target.flip(0) * (1 - lam)


def smooth_targets(y: Tensor, smoothing: float) -> Tensor:
    off = smoothing / len(CLASSES)
    return torch.full((len(y), len(CLASSES)), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


# ------------------------------------------------------------------------------------ training


def build_model(recipe: Recipe) -> nn.Module:
    return timm.create_model(
        ARCH, pretrained=False, num_classes=len(CLASSES), drop_path_rate=recipe.drop_path_rate, **MODEL_KWARGS
    )


def make_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the position embedding (timm convention)."""
    groups = timm.optim.param_groups_weight_decay(model, recipe.weight_decay, model.no_weight_decay())
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, fused=device.type == "cuda")


def lr_at(step: int, total: int, warmup: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to min_lr, per optimiser step."""
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int, device: torch.device) -> tuple[torch.Generator, np.random.Generator]:
    """Seeds torch (init, drop path), a device generator (order, augmentation), numpy (mixup)."""
    random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, np.random.default_rng(seed)


@torch.no_grad()
def evaluate(model: nn.Module, x_u8: Tensor, y: Tensor, mean: Tensor, std: Tensor, amp: bool) -> float:
    """Top-1 accuracy; eager and in eval mode (the compiled graph stays the training one)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x_u8), 1000):
        with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(normalize(x_u8[start : start + 1000], mean, std))
        correct += (logits.argmax(1) == y[start : start + 1000]).sum()
    model.train(was_training)
    return correct.item() / len(y)


class Trainer:
    """One optimiser step = sample draws, fused augmentation, mixup, forward/backward, AdamW."""

    def __init__(self, model: nn.Module, data: Cifar, recipe: Recipe, stats: tuple[Tensor, Tensor], compile_: bool):
        self.model, self.data, self.recipe = model, data, recipe
        self.mean, self.std = stats
        self.device = data.train_x.device
        self.amp = self.device.type == "cuda"
        self.compiled = compile_
        self.forward: Callable[[Tensor], Tensor] = torch.compile(model) if compile_ else model
        self.augment = torch.compile(apply_aug) if compile_ else apply_aug

    def step(
        self, opt: torch.optim.Optimizer, idx: Tensor, lr: float, gen: torch.Generator, rng: np.random.Generator
    ) -> Tensor:
        r = self.recipe
        draws = sample_aug(len(idx), r, gen, self.device)
        x = self.augment(self.data.train_x[idx], draws, self.mean, self.std)
        x, target = mix(x, smooth_targets(self.data.train_y[idx], r.label_smoothing), r, rng)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward(x)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        return loss.detach()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def calibrate(trainer: Trainer, recipe: Recipe, steps_per_epoch: int, epochs: int) -> tuple[int, float]:
    """Compile and time optimiser steps; return the epochs that fit the budget (or `epochs`) and the step time.

    Runs on a throwaway optimiser; the caller restores the initial weights and reseeds afterwards,
    so a calibrated run equals a run started with `--epochs` set to the chosen value. If compilation
    fails, the trainer falls back to eager mode rather than losing the GPU call.
    """
    gen, rng = seed_everything(recipe.seed + 1, trainer.device)
    opt = make_optimizer(trainer.model, recipe, trainer.device)
    idx = torch.randperm(len(trainer.data.train_x), generator=gen, device=trainer.device)[: recipe.batch_size]
    t0 = time.perf_counter()
    try:
        for _ in range(5):  # compile + warm-up
            trainer.step(opt, idx, 1e-5, gen, rng)
        trainer.sync()
    except Exception as error:  # any compiler failure: train eagerly instead
        print(f"WARNING: torch.compile failed ({type(error).__name__}: {error}); training eagerly")
        trainer.forward, trainer.augment, trainer.compiled = trainer.model, apply_aug, False
        for _ in range(5):
            trainer.step(opt, idx, 1e-5, gen, rng)
        trainer.sync()
    print(f"calibration: compile + 5 warm-up steps {time.perf_counter() - t0:.1f} s")
    timed = 30
    t0 = time.perf_counter()
    for _ in range(timed):
        trainer.step(opt, idx, 1e-5, gen, rng)
    trainer.sync()
    step_s = (time.perf_counter() - t0) / timed
    epoch_s = step_s * steps_per_epoch * 1.03  # per-epoch shuffle, logging and evals
    if not epochs:
        epochs = int(recipe.time_budget_s / epoch_s)
        epochs = max(10, min(recipe.max_epochs, epochs - epochs % 10))
    print(f"calibration: {step_s * 1e3:.2f} ms/step, ~{epoch_s:.2f} s/epoch -> {epochs} epochs")
    return epochs, step_s


def train(trainer: Trainer, recipe: Recipe, steps_per_epoch: int, hard_stop_s: float) -> dict[str, Any]:
    """The seeded run: returns the per-epoch log, timings and the final test accuracy."""
    gen, rng = seed_everything(recipe.seed, trainer.device)
    opt = make_optimizer(trainer.model, recipe, trainer.device)
    data, n = trainer.data, len(trainer.data.train_x)
    total = recipe.epochs * steps_per_epoch
    warmup = max(1, round(recipe.warmup_frac * total))
    eval_every = max(1, recipe.epochs // recipe.eval_points)
    log: list[dict[str, Any]] = []
    stopped_early = False
    trainer.model.train()
    t_start = time.perf_counter()
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen, device=trainer.device)
        loss_sum = torch.zeros((), device=trainer.device)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            loss_sum += trainer.step(opt, idx, lr_at(step, total, warmup, recipe), gen, rng)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": round(opt.param_groups[0]["lr"], 7),
            "train_loss": round(loss_sum.item() / steps_per_epoch, 4),
            "epoch_s": round(time.perf_counter() - t0, 3),
        }
        elapsed = time.perf_counter() - t_start
        last = epoch + 1 == recipe.epochs or elapsed > hard_stop_s
        if (epoch + 1) % eval_every == 0 or last:
            row["test_acc"] = round(
                evaluate(trainer.model, data.test_x, data.test_y, trainer.mean, trainer.std, trainer.amp), 4
            )
        log.append(row)
        if "test_acc" in row or epoch < 3:
            print(f"epoch {epoch + 1}/{recipe.epochs} {json.dumps(row)} elapsed {elapsed:.1f} s", flush=True)
        if elapsed > hard_stop_s and epoch + 1 < recipe.epochs:
            print(f"hard stop: {elapsed:.0f} s > {hard_stop_s:.0f} s, ending after epoch {epoch + 1}")
            stopped_early = True
            break
    train_s = time.perf_counter() - t_start
    epoch_times = sorted(row["epoch_s"] for row in log[1:]) or [log[0]["epoch_s"]]
    return {
        "log": log,
        "train_wall_time_s": round(train_s, 1),
        "epoch_time_s_median": epoch_times[len(epoch_times) // 2],
        "epochs_completed": len(log),
        "stopped_early": stopped_early,
        "test_accuracy": log[-1]["test_acc"],
    }


# -------------------------------------------------------------------------------------- export


def export(model: nn.Module, data: Cifar, mean: list[float], std: list[float], amp: bool) -> tuple[dict, float]:
    """fp16 backbone state dict (no head.*), checked by rebuilding it the way lnshift will."""
    backbone = {
        k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")
    }
    rebuilt = timm.create_model(ARCH, pretrained=False, num_classes=0, **MODEL_KWARGS)
    rebuilt.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=True)
    rebuilt.reset_classifier(len(CLASSES))
    rebuilt.head.load_state_dict(model.head.state_dict())
    device = data.test_x.device
    stats = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    acc = evaluate(rebuilt.to(device), data.test_x, data.test_y, *stats, amp)
    return backbone, acc


def main() -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_PACK if DEFAULT_PACK.exists() else DEFAULT_ZIP)
    parser.add_argument("--weights", type=Path, default=ROOT / "src/lnshift/assets/vit-tiny-cifar10.safetensors")
    parser.add_argument("--results", type=Path, default=ROOT / "pretrain/results.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=0, help="smoke tests: use this many train and test images")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument(
        "--deadline-s", type=float, default=0.0, help="end training early so the script ends by then (0: 1.2x budget)"
    )
    for name in ("seed", "epochs", "time_budget_s", "batch_size", "lr", "max_epochs"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    t_script = time.perf_counter()
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    device = torch.device(args.device)

    data = load_cifar(args.data, args.limit, args.workers)
    mean, std = channel_stats(data.train_x)
    print(f"train {tuple(data.train_x.shape)}, test {tuple(data.test_x.shape)}, mean {mean}, std {std}")
    data = Cifar(
        *(t.to(device) for t in (data.train_x, data.train_y, data.test_x, data.test_y)),
        data.content_sha256,
        data.source_zip_sha256,
    )
    stats = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, timm {timm.__version__}")

    seed_everything(recipe.seed, device)
    model = build_model(recipe).to(device)
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))
    print(f"{ARCH} {MODEL_KWARGS}: {n_params / 1e6:.3f}M backbone parameters")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, data, recipe, stats, compile_=not args.no_compile)
    steps_per_epoch = len(data.train_x) // recipe.batch_size
    recipe.epochs, step_s = calibrate(trainer, recipe, steps_per_epoch, recipe.epochs)
    model.load_state_dict(initial)
    # Training stops early (and says so) past the hard stop, so the call never loses its results.
    spent = time.perf_counter() - t_script
    hard_stop = args.deadline_s - spent - 30 if args.deadline_s else 1.2 * recipe.time_budget_s
    print(f"recipe: {json.dumps(asdict(recipe))}; hard stop after {hard_stop:.0f} s of training")
    result = train(trainer, recipe, steps_per_epoch, hard_stop)
    backbone, export_acc = export(model, data, mean, std, trainer.amp)
    print(f"test accuracy {result['test_accuracy']:.4f} (trained), {export_acc:.4f} (exported fp16 backbone + head)")

    data_config = {"input_size": [3, IMG, IMG], "mean": mean, "std": std, "interpolation": "bicubic", "crop_pct": 1.0}
    record = {
        "arch": ARCH,
        "model_kwargs": MODEL_KWARGS,
        "rebuild": f"timm.create_model({ARCH!r}, pretrained=False, num_classes=0, "
        + ", ".join(f"{k}={v!r}" for k, v in MODEL_KWARGS.items())
        + ")",
        "backbone_params": n_params,
        "pretraining_task": "supervised CIFAR-10 classification (train split, 50,000 images)",
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "epochs": recipe.epochs,
        "data": {
            "content_sha256": data.content_sha256,
            "source_zip_sha256": data.source_zip_sha256,
            "train_images": len(data.train_x),
            "test_images": len(data.test_x),
        },
        "test_accuracy": result["test_accuracy"],
        "test_accuracy_exported_fp16": round(export_acc, 4),
        "calibration_step_ms": round(step_s * 1e3, 3),
        "epoch_time_s_median": result["epoch_time_s_median"],
        "epochs_completed": result["epochs_completed"],
        "stopped_early": result["stopped_early"],
        "train_wall_time_s": result["train_wall_time_s"],
        "script_wall_time_s": round(time.perf_counter() - t_script, 1),
        "compiled": trainer.compiled,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        backbone,
        str(args.weights),
        metadata={"lnshift.data_config": json.dumps(data_config), "lnshift.recipe": json.dumps(record)},
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({**record, "data_config": data_config, "log": result["log"]}, indent=1) + "\n")
    print(f"wrote {args.weights} ({args.weights.stat().st_size / 2**20:.2f} MiB) and {args.results}")
    print(f"record: {json.dumps(record)}")


if __name__ == "__main__":
    main()
