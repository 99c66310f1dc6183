"""Pretrain a 6-block ViT-Tiny (patch 4, 32 px) on Tiny-ImageNet-200's 100,000 training images, either
self-supervised (DINO: student/teacher self-distillation, teacher EMA, centring, multi-crop) or with the
supervised CIFAR-10 recipe of `pretrain_cifar10.py`, for the same wall-clock budget on the same GPU.

lnshift's second bundled model must know more than ten classes, and the paper's foundation models are
self-supervised; this script trains both candidates so the choice between them is measured. Both end
with the same frozen-feature evaluation on the 10,000 validation images (k-NN, k = 20, and a linear
probe), which are never trained or selected on. pretrain/README.md has the recipes and results.

    python pretrain/pretrain_tin.py --method dino          # GPU; weights + results JSON under .data/tin/
    python pretrain/pretrain_tin.py --method supervised
    python pretrain/pretrain_tin.py --method eval --weights src/lnshift/assets/vit-tiny-cifar10.safetensors
    python pretrain/pretrain_tin.py --method dino --device cpu --epochs 1 --limit 200 --batch-size 20 \\
        --no-compile --workers 1 --out /tmp/tin              # smoke test, a few minutes on a CPU

Two runs share one GPU with `--barrier-dir D --barrier-count 2`: each waits for the other's compilation
before its timed calibration, so both size their epochs to the GPU as it is shared while they train.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ARCH,
    IMG,
    MODEL_KWARGS,
    Images,
    Recipe,
    Trainer,
    attention_extremes,
    blend,
    build_model,
    calibrate,
    channel_stats,
    check_update,
    cosine,
    decode_all,
    evaluate,
    features,
    fp16_backbone,
    gray,
    knn_accuracy,
    linear_probe,
    make_optimizer,
    rebuild,
    seed_everything,
    setup_cuda,
    spaced,
    sync,
    to_nchw,
    train,
)
from prepare_data import content_sha256, file_sha256

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyimagenet200_32px.npz"


@dataclass
class DinoRecipe:
    """Every choice of the DINO recipe (Caron et al. 2021, scaled to 32 px); recorded verbatim."""

    seed: int = 0
    epochs: int = 0  # 0: pick from time_budget_s after a timed calibration
    time_budget_s: float = 300.0
    max_epochs: int = 1000
    batch_size: int = 500  # divides 100,000
    lr: float = 1e-3  # DINO's 5e-4 * batch / 256, rounded
    min_lr: float = 1e-5
    warmup_frac: float = 0.1  # DINO: 10 of 100 epochs
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 3.0
    drop_path_rate: float = 0.1
    freeze_last_layer_frac: float = 0.02  # DINO freezes the prototypes for its first epoch
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    out_dim: int = 4096
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_frac: float = 0.3
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine to 1 over training
    global_size: int = 32
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_crops: int = 6
    local_size: int = 16
    local_scale: tuple[float, float] = (0.05, 0.25)
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_prob: float = 0.2
    solarize_prob: float = 0.2  # second global view only, as in DINO
    eval_points: int = 5


# --------------------------------------------------------------------------------------- data


def load_tin(path: Path, limit: int, workers: int) -> Images:
    """Decode the packed JPEGs (shared header + bodies) of both splits; digests over names and JPEG bytes."""
    with np.load(path, allow_pickle=False) as pack:
        header = pack["jpeg_header"].tobytes()
        classes = tuple(c.decode() for c in pack["classes"].tolist())
        splits = {
            which: (pack[f"{which}_bodies"].tobytes(), pack[f"{which}_offsets"], pack[f"{which}_labels"])
            for which in ("train", "val")
        }
        names = [n.decode() for which in ("train", "val") for n in pack[f"{which}_names"].tolist()]
    files = {
        which: [header + body[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
        for which, (body, offsets, _) in splits.items()
    }
    digest = content_sha256(names, files["train"] + files["val"])
    source = file_sha256(path)
    print(f"data: {path} ({len(names)} JPEGs), content sha256 {digest}, file sha256 {source}", flush=True)
    parts = []
    for which, (_, _, labels) in splits.items():
        idx = spaced(len(labels), limit)
        parts += [to_nchw(decode_all([files[which][i] for i in idx], workers)), torch.from_numpy(labels[idx]).long()]
    return Images(*parts, classes=classes, content_sha256=digest, source_sha256=source)


# ------------------------------------------------------------------------------------ multi-crop
# DINO's views on batched GPU tensors: random resized crop + flip (one grid_sample), colour jitter,
# grayscale, solarisation. Gaussian blur is left out: at 32 px it erases most of the image.

YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_INV = torch.linalg.inv(YIQ)


def sample_views(
    n: int, scale: tuple[float, float], solarize: Tensor, r: DinoRecipe, gen: torch.Generator, device: torch.device
) -> dict[str, Tensor]:
    """Per-view random draws; `solarize` holds each view's solarisation probability."""

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)

    area = uniform(*scale)
    ratio = uniform(math.log(3 / 4), math.log(4 / 3)).exp()
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # side fractions
    cx, cy = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    return {
        "box": torch.stack([w * flip, h, cx, cy], 1),
        "jitter": uniform(0, 1) < r.jitter_prob,
        "brightness": uniform(1 - r.brightness, 1 + r.brightness),
        "contrast": uniform(1 - r.contrast, 1 + r.contrast),
        "saturation": uniform(1 - r.saturation, 1 + r.saturation),
        "hue": uniform(-r.hue, r.hue),
        "gray": uniform(0, 1) < r.gray_prob,
        "solarize": uniform(0, 1) < solarize,
    }


def rotate_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Hue shift by `turns` of a full circle: a rotation of the chroma plane in YIQ space."""
    angle = turns * 2 * math.pi
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    matrix = YIQ_INV.to(x.device) @ rot @ YIQ.to(x.device)
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp(0, 1)


def apply_views(x_u8: Tensor, p: dict[str, Tensor], size: int, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 batch -> normalised views of `size` px (pure function of the draws in `p`)."""
    x = x_u8.float() / 255
    w, h, cx, cy = p["box"].unbind(1)
    zero = torch.zeros_like(w)
    theta = torch.stack([w, zero, cx, zero, h, cy], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, [len(x), 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jittered = blend(x, torch.zeros_like(x), p["brightness"])
    jittered = blend(jittered, gray(jittered).mean((2, 3), keepdim=True), p["contrast"])
    jittered = blend(jittered, gray(jittered), p["saturation"])
    jittered = rotate_hue(jittered, p["hue"])
    x = torch.where(p["jitter"].view(-1, 1, 1, 1), jittered, x)
    x = torch.where(p["gray"].view(-1, 1, 1, 1), gray(x), x)
    x = torch.where(p["solarize"].view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------ DINO


class DinoHead(nn.Module):
    """DINO's projection head: 3-layer MLP, L2-normalised bottleneck, weight-normalised prototypes (g = 1)."""

    def __init__(self, in_dim: int, r: DinoRecipe):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, r.hidden_dim),
            nn.GELU(),
            nn.Linear(r.hidden_dim, r.hidden_dim),
            nn.GELU(),
            nn.Linear(r.hidden_dim, r.bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(r.out_dim, r.bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        z = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):  # cosine logits in float32: they are divided by 0.04
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T


class DinoNet(nn.Module):
    """Backbone (lnshift's ViT, any input size) + head; the backbone is what ships."""

    def __init__(self, r: DinoRecipe, drop_path_rate: float):
        super().__init__()
        self.backbone = build_model(0, drop_path_rate, dynamic_img_size=True)
        self.head = DinoHead(self.backbone.num_features, r)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, r: DinoRecipe, teacher_temp: float) -> Tensor:
    """Cross-entropy of every student view against each teacher (global) view but its own, averaged."""
    views, globals_ = student.shape[0], teacher.shape[0]
    log_p = F.log_softmax(student / r.student_temp, dim=-1)  # (views, B, K)
    q = F.softmax((teacher - center) / teacher_temp, dim=-1)  # (globals, B, K)
    cross = -torch.einsum("gbk,vbk->gv", q, log_p) / student.shape[1]
    same = torch.eye(globals_, views, dtype=torch.bool, device=student.device)
    return cross.masked_fill(same, 0).sum() / (globals_ * views - globals_)


class DinoTrainer:
    """One step: 2 global + `local_crops` local views, student vs EMA teacher, AdamW, teacher EMA, centre update."""

    def __init__(self, data: Images, r: DinoRecipe, stats: tuple[Tensor, Tensor], compile_: bool):
        self.data, self.recipe = data, r
        self.mean, self.std = stats
        self.device = data.train_x.device
        self.n_train = len(data.train_x)
        self.amp = self.device.type == "cuda"
        self.student = DinoNet(r, r.drop_path_rate).to(self.device)
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)  # eval: no drop path
        self.center = torch.zeros(r.out_dim, device=self.device)
        self.skipped: list[int] = []
        self.diagnoses: list[dict[str, Any]] = []
        self.initial = copy.deepcopy((self.student.state_dict(), self.teacher.state_dict()))
        self.compiled = compile_
        self.uncompile()
        if compile_:
            self.student_fwd = torch.compile(self.student, dynamic=False)
            self.teacher_fwd = torch.compile(self.teacher, dynamic=False)
            self.augment = torch.compile(apply_views, dynamic=False)

    def uncompile(self) -> None:
        self.student_fwd, self.teacher_fwd, self.augment = self.student, self.teacher, apply_views
        self.compiled = False

    def reset(self) -> None:
        """Back to the seeded initial state, after calibration."""
        self.student.load_state_dict(self.initial[0])
        self.teacher.load_state_dict(self.initial[1])
        self.center.zero_()
        self.skipped.clear()
        self.diagnoses.clear()

    def make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        return make_optimizer(self.student, r.lr, r.weight_decay, r.betas, self.device)

    def loss(
        self,
        student_fwd: Callable[[Tensor], Tensor],
        teacher_fwd: Callable[[Tensor], Tensor],
        views: tuple[Tensor, Tensor],
        temp: float,
    ) -> tuple[Tensor, Tensor]:
        """The DINO loss of one batch's global and local views, and the teacher's outputs (for the centre)."""
        r, n = self.recipe, len(views[0]) // 2
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                teacher = teacher_fwd(views[0]).float()
            student = torch.cat([student_fwd(views[0]), student_fwd(views[1])]).float()
        return dino_loss(student.view(-1, n, r.out_dim), teacher.view(2, n, r.out_dim), self.center, r, temp), teacher

    def step(
        self,
        opt: torch.optim.Optimizer,
        idx: Tensor,
        step: int,
        total: int,
        gen: torch.Generator,
        rng: np.random.Generator,
    ) -> Tensor:
        r, n = self.recipe, len(idx)
        x = self.data.train_x[idx]
        solarize = torch.tensor([0.0, r.solarize_prob], device=self.device).repeat_interleave(n)
        g = sample_views(2 * n, r.global_scale, solarize, r, gen, self.device)
        loc = sample_views(r.local_crops * n, r.local_scale, torch.zeros((), device=self.device), r, gen, self.device)
        global_views = self.augment(x.repeat(2, 1, 1, 1), g, r.global_size, self.mean, self.std)
        local_views = self.augment(x.repeat(r.local_crops, 1, 1, 1), loc, r.local_size, self.mean, self.std)
        views = global_views, local_views
        warm = max(1, round(r.teacher_temp_warmup_frac * total))
        temp = r.teacher_temp + (r.warmup_teacher_temp - r.teacher_temp) * max(0.0, 1 - step / warm)
        loss, teacher = self.loss(self.student_fwd, self.teacher_fwd, views, temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.student.parameters(), r.grad_clip)

        def eager() -> Tensor:
            return self.loss(self.student, self.teacher, views, temp)[0]

        if not check_update(self, loss, norm, step, views, {"student": self.student, "teacher": self.teacher}, eager):
            opt.zero_grad(set_to_none=True)
            return torch.zeros_like(loss)
        if step < r.freeze_last_layer_frac * total:
            self.student.head.prototypes.grad = None
        lr = cosine(step, total, max(1, round(r.warmup_frac * total)), r.lr, r.min_lr)
        wd = cosine(step, total, 0, r.weight_decay, r.weight_decay_end)  # rises: peak < final
        for group in opt.param_groups:
            group["lr"] = lr
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd
        opt.step()
        with torch.no_grad():
            momentum = 1 - (1 - r.momentum_teacher) * (math.cos(math.pi * min(1.0, step / total)) + 1) / 2
            torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()), 1 - momentum)
            self.center.lerp_(teacher.mean(0), 1 - r.center_momentum)
        return loss.detach()

    def monitor(self) -> dict[str, float]:
        """k-NN accuracy of the teacher's backbone on the validation images and the student's attention extremes
        (progress signals, not a selection)."""
        backbone, data = self.teacher.backbone, self.data
        train_f = features(backbone, data.train_x, self.mean, self.std, self.amp)
        test_f = features(backbone, data.test_x, self.mean, self.std, self.amp)
        knn = knn_accuracy(train_f, data.train_y, test_f, data.test_y)
        return {"knn_acc": round(knn, 4), **attention_extremes(self.student, data.test_x[:500], self.mean, self.std)}


# ------------------------------------------------------------------------------------ evaluate


def frozen_quality(model: nn.Module, data: Images, stats: tuple[Tensor, Tensor], seed: int) -> dict[str, Any]:
    """k-NN (k = 20) and linear-probe top-1 on the validation images, from the shipped fp16 backbone.

    Non-finite features (a diverged model) are counted instead: they would crash the probe's L-BFGS."""
    amp = data.train_x.device.type == "cuda"
    t0 = time.perf_counter()
    train_f = features(model, data.train_x, *stats, amp)
    test_f = features(model, data.test_x, *stats, amp)
    bad = int((~train_f.isfinite()).any(1).sum() + (~test_f.isfinite()).any(1).sum())
    if bad:
        print(f"{bad} of {len(train_f) + len(test_f)} images have non-finite features: no k-NN or probe", flush=True)
        return {"non_finite_feature_images": bad}
    probe = linear_probe(train_f, data.train_y, test_f, data.test_y, seed=seed)
    return {
        "knn20_top1": round(knn_accuracy(train_f, data.train_y, test_f, data.test_y), 4),
        "linear_probe_top1": probe["acc"],
        "linear_probe_weight_decay": probe["weight_decay"],
        "linear_probe_heldout_top1": round(probe["heldout_acc"], 4),
        "eval_s": round(time.perf_counter() - t0, 1),
    }


def make_barrier(folder: Path | None, count: int, name: str, timeout_s: float = 180.0) -> Callable[[], None] | None:
    """A file barrier between runs sharing a GPU (None when there is nothing to wait for)."""
    if folder is None or count <= 1:
        return None

    def wait() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.ready").touch()
        t0 = time.perf_counter()
        while len(list(folder.glob("*.ready"))) < count and time.perf_counter() - t0 < timeout_s:
            time.sleep(0.2)
        print(f"barrier: waited {time.perf_counter() - t0:.1f} s for {count} runs", flush=True)

    return wait


def save(backbone: dict[str, Tensor], record: dict[str, Any], data_config: dict, log: list, out: Path) -> None:
    """Weights (fp16, recipe and preprocessing in the metadata) and the results JSON, under `record['name']`."""
    out.mkdir(parents=True, exist_ok=True)
    weights, results = out / f"{record['name']}.safetensors", out / f"{record['name']}.json"
    metadata = {"lnshift.data_config": json.dumps(data_config), "lnshift.recipe": json.dumps(record)}
    save_file(backbone, str(weights), metadata=metadata)
    results.write_text(json.dumps({**record, "data_config": data_config, "log": log}, indent=1) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.2f} MiB) and {results}", flush=True)


def evaluate_file(args: argparse.Namespace, device: torch.device) -> None:
    """`--method eval`: the frozen-feature quality of an existing backbone file (its own preprocessing)."""
    with safe_open(str(args.weights), "pt") as f:
        backbone = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        config = json.loads(f.metadata()["lnshift.data_config"])
    data = load_tin(args.data, args.limit, args.workers).to(device)
    stats = torch.tensor(config["mean"], device=device), torch.tensor(config["std"], device=device)
    quality = frozen_quality(rebuild(backbone, device), data, stats, seed=0)
    record = {"weights": args.weights.name, "data_config": config, "tin_val": quality, "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.weights.stem}.tin.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"quality on the validation images: {json.dumps(quality)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("dino", "supervised", "eval"), required=True)
    parser.add_argument("--weights", type=Path, help="--method eval: the backbone file to evaluate")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / ".data" / "tin", help="folder for weights, results JSON")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=0, help="smoke tests: use this many train and val images")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--deadline-s", type=float, default=0.0, help="end training so the script ends by then")
    parser.add_argument("--barrier-dir", type=Path, default=None)
    parser.add_argument("--barrier-count", type=int, default=1)
    parser.add_argument("--timing-s", type=float, default=10.0, help="time calibration steps for at least this long")
    for name in ("seed", "epochs", "time_budget_s", "batch_size", "max_epochs"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(DinoRecipe(), name)), default=None)
    args = parser.parse_args()
    t_script = time.perf_counter()
    device = torch.device(args.device)
    if args.method == "eval":
        evaluate_file(args, device)
        return
    kind = DinoRecipe if args.method == "dino" else Recipe
    overrides = {
        k: getattr(args, k) for k in ("seed", "epochs", "batch_size", "max_epochs") if getattr(args, k) is not None
    }
    # Both methods get the DINO recipe's budget unless told otherwise: the comparison is at equal time.
    overrides["time_budget_s"] = args.time_budget_s or DinoRecipe.time_budget_s
    recipe = kind(**overrides)

    data = load_tin(args.data, args.limit, args.workers)
    mean, std = channel_stats(data.train_x)
    print(f"train {tuple(data.train_x.shape)}, val {tuple(data.test_x.shape)}, mean {mean}, std {std}", flush=True)
    data = data.to(device)
    stats = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    setup_cuda(device)

    seed_everything(recipe.seed, device)
    compile_ = not args.no_compile
    if isinstance(recipe, DinoRecipe):
        trainer: Any = DinoTrainer(data, recipe, stats, compile_)
        backbone_module = trainer.teacher.backbone  # DINO evaluates (and ships) the teacher
    else:
        backbone_module = build_model(len(data.classes), recipe.drop_path_rate).to(device)
        trainer = Trainer(backbone_module, data, recipe, stats, compile_)
    # one file per process: two runs of one method (a same-seed reproduction) share a GPU too
    barrier = make_barrier(args.barrier_dir, args.barrier_count, f"{args.method}-{os.getpid()}")
    recipe.epochs, step_s = calibrate(trainer, recipe, recipe.epochs, barrier, args.timing_s)
    trainer.reset()
    spent = time.perf_counter() - t_script
    hard_stop = args.deadline_s - spent - 40 if args.deadline_s else 1.2 * recipe.time_budget_s
    print(f"recipe: {json.dumps(asdict(recipe))}; hard stop after {hard_stop:.0f} s of training", flush=True)
    result = train(trainer, recipe, hard_stop)
    sync(device)

    backbone = fp16_backbone(backbone_module)
    data_config = {"input_size": [3, IMG, IMG], "mean": mean, "std": std, "interpolation": "bicubic", "crop_pct": 1.0}
    record = {
        "name": f"vit-tiny-in200-{'ssl' if args.method == 'dino' else 'sup'}",
        "arch": ARCH,
        "model_kwargs": MODEL_KWARGS,
        "backbone_params": sum(v.numel() for v in backbone.values()),
        "pretraining_task": (
            "self-supervised DINO (teacher backbone shipped)" if args.method == "dino" else "supervised classification"
        )
        + " on Tiny-ImageNet-200 train at 32 px (100,000 images, 200 classes)",
        "method": args.method,
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "epochs": recipe.epochs,
        "command": " ".join(sys.argv),
        "data": {
            "file": args.data.name,
            "file_sha256": data.source_sha256,
            "content_sha256": data.content_sha256,
            "train_images": len(data.train_x),
            "val_images": len(data.test_x),
            "limit": args.limit,
        },
        "calibration_step_ms": round(step_s * 1e3, 3),
        **{k: v for k, v in result.items() if k != "log"},
        "shared_gpu_with": args.barrier_count - 1,
        "compiled": trainer.compiled,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    save(backbone, record, data_config, result["log"], args.out)  # before evaluating: an evaluation bug loses nothing
    quality = frozen_quality(rebuild(backbone, device), data, stats, recipe.seed)
    if isinstance(recipe, Recipe):
        quality["classifier_top1"] = round(evaluate(backbone_module, data.test_x, data.test_y, *stats, trainer.amp), 4)
    print(f"quality on the validation images: {json.dumps(quality)}", flush=True)
    record["tin_val"] = quality
    record["script_wall_time_s"] = round(time.perf_counter() - t_script, 1)
    save(backbone, record, data_config, result["log"], args.out)
    print(f"record: {json.dumps(record)}")


if __name__ == "__main__":
    main()
