"""What lnshift's pretraining scripts share: the ViT, image decoding, GPU augmentation, the supervised
recipe and its training loop, and the frozen-feature evaluations (k-NN, linear probe).

`pretrain_cifar10.py` (supervised, CIFAR-10) and `pretrain_tin.py` (DINO or supervised, Tiny-ImageNet)
import it, so the two bundled models differ only where their recipes do.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import timm
import timm.optim
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import Attention
from torch import Tensor, nn

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
IMG = 32


@dataclass
class Recipe:
    """Every choice of the supervised recipe; recorded verbatim in the weights' metadata."""

    seed: int = 0
    epochs: int = 0  # 0: pick from time_budget_s after a timed calibration
    time_budget_s: float = 390.0
    max_epochs: int = 1000
    batch_size: int = 500  # divides 50,000 and 100,000: every image is seen once per epoch
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
    """Decode in worker processes (forked before CUDA starts); ~9 s on one core, ~1 s on 16 for 60k images."""
    if workers <= 1:
        return decode(files)
    chunks = [files[i : i + 2000] for i in range(0, len(files), 2000)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return np.concatenate(pool.map(decode, chunks))


def to_nchw(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def spaced(n: int, limit: int) -> np.ndarray:
    """Indices of an evenly spaced subset (all of them when `limit` is 0): smoke tests still cover every class."""
    return np.linspace(0, n - 1, min(limit, n)).astype(np.int64) if limit else np.arange(n)


@dataclass
class Images:
    """A labelled train/test image set as uint8 NCHW tensors, plus the digests of the files they came from."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    content_sha256: str
    source_sha256: str | None

    def to(self, device: torch.device) -> Images:
        moved = (t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y))
        return Images(*moved, self.classes, self.content_sha256, self.source_sha256)


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


def blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma, as PIL's convert('L'), broadcast back to three channels."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def warp(x: Tensor, theta: Tensor, size: int, mean: Tensor) -> Tensor:
    """One `grid_sample` for any affine map (theta: output -> input on the [-1, 1] grid); outside = mean colour."""
    grid = F.affine_grid(theta, [len(x), 3, size, size], align_corners=False)
    m = mean.view(1, 3, 1, 1)
    return F.grid_sample(x - m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + m


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
    x = blend(x, gray(x), 1 + 0.9 * signed[:, OP["color"]])
    x = blend(x, gray(x).mean((2, 3), keepdim=True), 1 + 0.9 * signed[:, OP["contrast"]])
    x = blend(x, torch.zeros_like(x), 1 + 0.9 * signed[:, OP["brightness"]])
    kernel = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]).div(13).expand(3, 1, 3, 3)
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = blend(x, smooth, 1 + 0.9 * signed[:, OP["sharpness"]])

    # One warp for every geometric op + the padded random crop + the flip. With only integer shifts
    # and flips it samples exact pixels.
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
    return (warp(x, theta, IMG, mean) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


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


def smooth_targets(y: Tensor, smoothing: float, num_classes: int) -> Tensor:
    off = smoothing / num_classes
    return torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


# ------------------------------------------------------------------------------------ training


def build_model(num_classes: int, drop_path_rate: float, **extra: Any) -> nn.Module:
    return timm.create_model(
        ARCH, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, **MODEL_KWARGS, **extra
    )


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the position embedding (timm convention)."""
    groups = timm.optim.param_groups_weight_decay(model, weight_decay, model.no_weight_decay())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def cosine(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 to `peak`, then cosine decay to `final`, per optimiser step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int, device: torch.device) -> tuple[torch.Generator, np.random.Generator]:
    """Seeds torch (init, drop path), a device generator (order, augmentation), numpy (mixup)."""
    random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, np.random.default_rng(seed)


@torch.no_grad()
def features(model: nn.Module, x_u8: Tensor, mean: Tensor, std: Tensor, amp: bool, batch: int = 1000) -> Tensor:
    """Pooled backbone features (what lnshift's heads see), eager and in eval mode, as float32."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x_u8), batch):
        with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=amp):
            tokens = model.forward_features(normalize(x_u8[start : start + batch], mean, std))
            out.append(model.forward_head(tokens, pre_logits=True).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, x_u8: Tensor, y: Tensor, mean: Tensor, std: Tensor, amp: bool) -> float:
    """Top-1 accuracy of the model's own classifier (the compiled graph stays the training one)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x_u8), 1000):
        with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(normalize(x_u8[start : start + 1000], mean, std))
        correct += (logits.argmax(1) == y[start : start + 1000]).sum()
    model.train(was_training)
    return correct.item() / len(y)


@torch.no_grad()
def attention_extremes(model: nn.Module, x_u8: Tensor, mean: Tensor, std: Tensor) -> dict[str, float]:
    """The lowest row log-sum-exp and the largest |logit| over every attention softmax of `model` on one batch
    (eval mode, float32). Softmax ignores a constant added to a row, so nothing stops a row's logits from
    drifting far below zero under AdamW; cuDNN's attention backward has returned NaN once a row's log-sum-exp
    falls below about -88 (see `setup_cuda`). A progress signal for the GPU logs, not a selection."""
    found = {"attn_lse_min": math.inf, "attn_logit_absmax": 0.0}

    def record(attn: Attention, inputs: tuple[Tensor, ...], _: Tensor) -> None:
        x = inputs[0].float()
        qkv = F.linear(x, attn.qkv.weight.float(), None if attn.qkv.bias is None else attn.qkv.bias.float())
        q, k, _v = qkv.view(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1) * attn.scale
        found["attn_lse_min"] = min(found["attn_lse_min"], round(logits.logsumexp(-1).min().item(), 2))
        found["attn_logit_absmax"] = max(found["attn_logit_absmax"], round(logits.abs().max().item(), 2))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Attention)]
    was_training = model.training
    model.eval()
    try:
        model(normalize(x_u8, mean, std))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def locate_non_finite(modules: dict[str, nn.Module], loss_fn: Callable[[], Tensor]) -> tuple[bool, str]:
    """Re-run one step's loss and backward eagerly with a finite check on every submodule's output and anomaly
    detection in the backward: whether it came out finite this time, and if not, where it first did not.

    The caller zeroes the gradients the re-run leaves behind."""
    params = {f"{name}.{p}": w for name, module in modules.items() for p, w in module.named_parameters()}
    bad = [name for name, w in params.items() if not w.isfinite().all()]
    if bad:
        return False, f"non-finite parameters before the step: {', '.join(bad[:5])}"
    names = {m: f"{name}.{sub}".rstrip(".") for name, module in modules.items() for sub, m in module.named_modules()}
    first: list[str] = []

    def check(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        if first or all(t.isfinite().all() for t in outputs if isinstance(t, Tensor) and t.is_floating_point()):
            return
        finite_in = all(t.isfinite().all() for t in inputs if isinstance(t, Tensor) and t.is_floating_point())
        first.append(f"output of {names[module]} ({type(module).__name__}; inputs {'' if finite_in else 'non-'}finite)")

    handles = [m.register_forward_hook(check) for m in names]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomaly mode's notices: that it is on, the forward's traceback
            with torch.autograd.detect_anomaly(check_nan=True):
                loss = loss_fn()
                if first or not loss.isfinite():
                    return False, first[0] if first else f"the loss ({loss.item()}), every module output finite"
                loss.backward()
    except RuntimeError as error:  # anomaly mode names the backward function that returned NaN
        return False, f"backward: {str(error).splitlines()[0]}"
    finally:
        for handle in handles:
            handle.remove()
    return True, "finite when re-run eagerly"


DIAGNOSED_STEPS = 3  # non-finite steps re-run eagerly to locate the fault; later ones are only counted


def check_update(
    trainer: StepTrainer,
    loss: Tensor,
    grad_norm: Tensor,
    step: int,
    inputs: tuple[Tensor, ...],
    modules: dict[str, nn.Module],
    eager_loss: Callable[[], Tensor],
) -> bool:
    """Whether this step's loss and gradient are finite; if not, the caller skips the update (as AMP's GradScaler
    does), so one bad batch cannot turn every weight into NaN. Costs one host sync per step.

    The first `DIAGNOSED_STEPS` failures are diagnosed and recorded in `trainer.diagnoses`: non-finite augmented
    `inputs`, or else the first non-finite module output or backward function when the step is re-run eagerly on
    the same inputs (`eager_loss`, through `modules`). A compiled trainer whose augmentation made the non-finite
    inputs, or whose failed step comes out finite eagerly, trains eagerly from then on: the first GPU run of the
    Tiny-ImageNet recipes went NaN in both compiled trainers (pretrain/README.md)."""
    if bool(loss.isfinite() & grad_norm.isfinite()):
        return True
    trainer.skipped.append(step)
    if len(trainer.skipped) > DIAGNOSED_STEPS:
        return False
    inputs_finite = all(bool(x.isfinite().all()) for x in inputs)
    finite, where = locate_non_finite(modules, eager_loss) if inputs_finite else (False, "the augmented inputs")
    note = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "compiled": trainer.compiled}
    trainer.diagnoses.append({**note, "eager_rerun_finite": finite, "where": where})
    print(f"step {step}: non-finite loss or gradient norm {json.dumps(note)}, update skipped; located: {where}")
    if trainer.compiled and (finite or not inputs_finite):
        print(f"step {step}: the compiled step went non-finite where eager mode does not: training eagerly from here")
        trainer.uncompile()
    return False


class StepTrainer(Protocol):
    """What `calibrate` and `train` need from a recipe's trainer."""

    device: torch.device
    compiled: bool
    n_train: int
    skipped: list[int]
    diagnoses: list[dict[str, Any]]

    def make_optimizer(self) -> torch.optim.Optimizer: ...
    def step(
        self,
        opt: torch.optim.Optimizer,
        idx: Tensor,
        step: int,
        total: int,
        gen: torch.Generator,
        rng: np.random.Generator,
    ) -> Tensor: ...
    def uncompile(self) -> None: ...
    def reset(self) -> None: ...
    def monitor(self) -> dict[str, float]: ...


class Trainer:
    """Supervised: one optimiser step = sample draws, fused augmentation, mixup, forward/backward, AdamW."""

    def __init__(self, model: nn.Module, data: Images, recipe: Recipe, stats: tuple[Tensor, Tensor], compile_: bool):
        self.model, self.data, self.recipe = model, data, recipe
        self.mean, self.std = stats
        self.device = data.train_x.device
        self.n_train = len(data.train_x)
        self.amp = self.device.type == "cuda"
        self.compiled = compile_
        self.forward: Callable[[Tensor], Tensor] = torch.compile(model) if compile_ else model
        self.augment = torch.compile(apply_aug) if compile_ else apply_aug
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        self.skipped: list[int] = []
        self.diagnoses: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Back to the seeded initial weights, after calibration."""
        self.model.load_state_dict(self.initial)
        self.skipped.clear()
        self.diagnoses.clear()

    def make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        return make_optimizer(self.model, r.lr, r.weight_decay, r.betas, self.device)

    def uncompile(self) -> None:
        self.forward, self.augment, self.compiled = self.model, apply_aug, False

    def loss(self, forward: Callable[[Tensor], Tensor], x: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = forward(x)
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()

    def step(
        self,
        opt: torch.optim.Optimizer,
        idx: Tensor,
        step: int,
        total: int,
        gen: torch.Generator,
        rng: np.random.Generator,
    ) -> Tensor:
        r = self.recipe
        draws = sample_aug(len(idx), r, gen, self.device)
        x = self.augment(self.data.train_x[idx], draws, self.mean, self.std)
        targets = smooth_targets(self.data.train_y[idx], r.label_smoothing, len(self.data.classes))
        x, targets = mix(x, targets, r, rng)
        loss = self.loss(self.forward, x, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
        eager = partial(self.loss, self.model, x, targets)
        if not check_update(self, loss, norm, step, (x,), {"model": self.model}, eager):
            opt.zero_grad(set_to_none=True)
            return torch.zeros_like(loss)
        lr = cosine(step, total, max(1, round(r.warmup_frac * total)), r.lr, r.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        return loss.detach()

    def monitor(self) -> dict[str, float]:
        data = self.data
        acc = evaluate(self.model, data.test_x, data.test_y, self.mean, self.std, self.amp)
        return {"test_acc": round(acc, 4), **attention_extremes(self.model, data.test_x[:500], self.mean, self.std)}


def setup_cuda(device: torch.device) -> None:
    """TF32 matmuls; attention by the flash or memory-efficient kernels, not cuDNN's (the default on H100/H200 since
    torch 2.11), whose backward has returned NaN for some short sequences and very negative attention logits
    (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#1072). A precaution, not a proven cure: both recipes drive
    some rows' logits far below zero within ~100 steps on the CPU (`attention_extremes`), and the first GPU run
    of the Tiny-ImageNet recipes went NaN in both trainers (pretrain/README.md)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, timm {timm.__version__}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def calibrate(
    trainer: StepTrainer,
    recipe: Any,
    epochs: int,
    barrier: Callable[[], None] | None = None,
    min_timed_s: float = 0.0,
) -> tuple[int, float]:
    """Compile and time optimiser steps; return the epochs that fit `recipe.time_budget_s` (or `epochs`), step time.

    Runs on a throwaway optimiser; the caller resets the trainer and `train` reseeds, so a
    calibrated run equals a run started with `--epochs` set to the chosen value. If compilation fails,
    the trainer falls back to eager mode rather than losing the GPU call. `barrier` runs between
    warm-up and timing: runs that share a GPU time their steps while the others are training too, for at
    least 30 steps and `min_timed_s` seconds, so that a fast run's timing overlaps a slow run's steps.
    """
    gen, rng = seed_everything(recipe.seed + 1, trainer.device)
    opt = trainer.make_optimizer()
    idx = torch.randperm(trainer.n_train, generator=gen, device=trainer.device)[: recipe.batch_size]
    steps_per_epoch = trainer.n_train // recipe.batch_size
    t0 = time.perf_counter()
    try:
        for _ in range(5):  # compile + warm-up
            trainer.step(opt, idx, 0, 10**9, gen, rng)
        sync(trainer.device)
    except Exception as error:  # any compiler failure: train eagerly instead
        print(f"WARNING: torch.compile failed ({type(error).__name__}: {error}); training eagerly")
        trainer.uncompile()
        for _ in range(5):
            trainer.step(opt, idx, 0, 10**9, gen, rng)
        sync(trainer.device)
    print(f"calibration: compile + 5 warm-up steps {time.perf_counter() - t0:.1f} s", flush=True)
    if barrier is not None:
        barrier()
    timed, t0 = 0, time.perf_counter()
    while timed < 30 or time.perf_counter() - t0 < min_timed_s:
        trainer.step(opt, idx, 0, 10**9, gen, rng)
        timed += 1
    sync(trainer.device)
    step_s = (time.perf_counter() - t0) / timed
    if trainer.skipped:
        print(f"calibration: {len(trainer.skipped)} of {timed + 5} steps non-finite", flush=True)
    epoch_s = step_s * steps_per_epoch * 1.03  # per-epoch shuffle, logging and evals
    if not epochs:
        epochs = int(recipe.time_budget_s / epoch_s)
        epochs = max(1, min(recipe.max_epochs, epochs - epochs % 10 if epochs >= 50 else epochs))
    print(f"calibration: {step_s * 1e3:.2f} ms/step, ~{epoch_s:.2f} s/epoch -> {epochs} epochs", flush=True)
    return epochs, step_s


def train(trainer: StepTrainer, recipe: Any, hard_stop_s: float) -> dict[str, Any]:
    """The seeded run over `recipe.epochs` epochs: returns the per-epoch log (with the trainer's monitor
    metrics at `recipe.eval_points` epochs and the last) and timings."""
    gen, rng = seed_everything(recipe.seed, trainer.device)
    opt = trainer.make_optimizer()
    n, batch = trainer.n_train, recipe.batch_size
    steps_per_epoch = n // batch
    total = recipe.epochs * steps_per_epoch
    eval_every = max(1, recipe.epochs // recipe.eval_points)
    log: list[dict[str, Any]] = []
    stopped_early = False
    t_start = time.perf_counter()
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen, device=trainer.device)
        loss_sum = torch.zeros((), device=trainer.device)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            loss_sum += trainer.step(opt, order[i * batch : (i + 1) * batch], step, total, gen, rng)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": round(opt.param_groups[0]["lr"], 7),
            "train_loss": round(loss_sum.item() / steps_per_epoch, 4),
            "epoch_s": round(time.perf_counter() - t0, 3),
        }
        elapsed = time.perf_counter() - t_start
        last = epoch + 1 == recipe.epochs or elapsed > hard_stop_s
        if (epoch + 1) % eval_every == 0 or last:
            row.update(trainer.monitor())
        log.append(row)
        if len(row) > 4 or epoch < 3:
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
        "skipped_steps": len(trainer.skipped),
        "first_skipped_steps": trainer.skipped[:20],
        "non_finite_diagnoses": trainer.diagnoses,
    }


# ---------------------------------------------------------------------------------- evaluation


def fp16_backbone(model: nn.Module) -> dict[str, Tensor]:
    """The backbone's state dict as shipped: fp16, no classifier (`head.*`), contiguous, on the CPU."""
    return {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}


def rebuild(backbone: dict[str, Tensor], device: torch.device) -> nn.Module:
    """The shipped backbone rebuilt the way lnshift builds it (strict load), in float32."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **MODEL_KWARGS)
    model.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def knn_accuracy(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 20, t: float = 0.07
) -> float:
    """Weighted k-NN top-1 on cosine similarity (DINO's protocol: votes exp(sim / t) over the k nearest)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(test_f), 1000):
        sim, nearest = (test_f[start : start + 1000] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[nearest], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[start : start + 1000]).sum().item()
    return correct / len(test_f)


PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def _fit_probe(x: Tensor, y: Tensor, classes: int, weight_decay: float, iters: int) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty, full batch, by L-BFGS (deterministic, no lr to tune)."""
    probe = nn.Linear(x.shape[1], classes).to(x.device)
    nn.init.zeros_(probe.weight), nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


@torch.no_grad()
def _accuracy(probe: nn.Linear, x: Tensor, y: Tensor) -> float:
    return (probe(x).argmax(1) == y).float().mean().item()


def linear_probe(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    groups: Tensor | None = None,
    seed: int = 0,
    iters: int = 300,
) -> dict[str, float]:
    """Top-1 of a linear classifier on standardised frozen features.

    The L2 strength comes from `PROBE_WEIGHT_DECAYS`, chosen on a held-out fifth of the training set
    (whole groups when `groups` is given, so near-duplicates never straddle it), then the probe is
    refitted on the whole training set. The test set is touched once.
    """
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    units = groups if groups is not None else torch.arange(len(train_y))
    ids = units.unique()
    held_units = ids[torch.randperm(len(ids), generator=gen)[: max(1, len(ids) // 5)]]
    held = torch.isin(units, held_units).to(train_f.device)
    scores = {}
    for wd in PROBE_WEIGHT_DECAYS:
        probe = _fit_probe(train_f[~held], train_y[~held], classes, wd, iters)
        scores[wd] = _accuracy(probe, train_f[held], train_y[held])
    best = max(scores, key=lambda wd: (scores[wd], wd))  # ties: the stronger penalty
    probe = _fit_probe(train_f, train_y, classes, best, iters)
    return {"acc": round(_accuracy(probe, test_f, test_y), 4), "weight_decay": best, "heldout_acc": scores[best]}
