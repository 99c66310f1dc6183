"""Forward passes over a split and the metrics of `metrics.py`; also the device / precision policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import ConfigError
from .distributed import gather_rows, is_main
from .metrics import classification_metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available here")
    return device


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on GPU by default; fp32 on CPU (bf16 on CPU is slow and changes results)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(
    loader: DataLoader, device: torch.device, desc: str, progress: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not (progress and is_main()), dynamic_ncols=True):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str,
    desc: str = "eval",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels for every sample of the loader, in loader order.

    In a data-parallel run each rank's loader holds its chunk of the split (distributed.local_chunk) and
    every rank gets the outputs of the whole split.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with autocast(device, precision):
        for x, y in batches(loader, device, desc, progress):
            logits.append(model(x).float().cpu())
            labels.append(y.cpu())
    model.train(was_training)
    if not logits:
        logits, labels = [torch.zeros(0, 0)], [torch.zeros(0, dtype=torch.int64)]
    return gather_rows(torch.cat(logits)).numpy(), gather_rows(torch.cat(labels)).numpy()


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    precision: str,
    desc: str = "eval",
    progress: bool = False,
) -> dict[str, float]:
    logits, labels = predict(model, loader, device, precision, desc, progress)
    metrics = classification_metrics(logits, labels, num_classes)
    metrics["loss"] = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    return metrics
