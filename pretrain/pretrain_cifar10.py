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
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ARCH,
    IMG,
    MODEL_KWARGS,
    Images,
    Recipe,
    Trainer,
    build_model,
    calibrate,
    channel_stats,
    decode_all,
    evaluate,
    fp16_backbone,
    rebuild,
    seed_everything,
    setup_cuda,
    spaced,
    to_nchw,
    train,
)
from prepare_data import DEFAULT_PACK, DEFAULT_ZIP, content_sha256, read_entries

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar(path: Path, limit: int, workers: int) -> Images:
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
        idx = idx[spaced(len(idx), limit)]
        parts += [to_nchw(decode_all([files[i] for i in idx], workers)), labels[idx]]
    return Images(*parts, classes=CLASSES, content_sha256=digest, source_sha256=zip_sha)


# -------------------------------------------------------------------------------------- export


def export(model: nn.Module, data: Images, mean: list[float], std: list[float], amp: bool) -> tuple[dict, float]:
    """fp16 backbone state dict (no head.*), checked by rebuilding it the way lnshift will."""
    backbone = fp16_backbone(model)
    device = data.test_x.device
    rebuilt = rebuild(backbone, device)
    rebuilt.reset_classifier(len(CLASSES))
    rebuilt.head.load_state_dict(model.head.state_dict())
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
    data = data.to(device)
    stats = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    setup_cuda(device)

    seed_everything(recipe.seed, device)
    model = build_model(len(CLASSES), recipe.drop_path_rate).to(device)
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))
    print(f"{ARCH} {MODEL_KWARGS}: {n_params / 1e6:.3f}M backbone parameters")
    trainer = Trainer(model, data, recipe, stats, compile_=not args.no_compile)
    recipe.epochs, step_s = calibrate(trainer, recipe, recipe.epochs)
    trainer.reset()
    # Training stops early (and says so) past the hard stop, so the call never loses its results.
    spent = time.perf_counter() - t_script
    hard_stop = args.deadline_s - spent - 30 if args.deadline_s else 1.2 * recipe.time_budget_s
    print(f"recipe: {json.dumps(asdict(recipe))}; hard stop after {hard_stop:.0f} s of training")
    result = train(trainer, recipe, hard_stop)
    result["test_accuracy"] = result["log"][-1]["test_acc"]
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
            "source_zip_sha256": data.source_sha256,
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
