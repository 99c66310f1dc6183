"""Choosing lambda on validation data: a whole grid of rescaled models scored in one batched pass.

Every LayerNorm is temporarily patched (blockwise.py) so that a batch of L x B images uses L different
(gamma, beta) sets, one per lambda: the frozen weights are read once per batch instead of once per
lambda, and the Python overhead is one pass. Selection accepts only a dataset tagged as the validation
split, so a test split can never choose lambda through this API.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..analyses.shift import rescale_batch
from ..data.device import DeviceImages, eval_batches
from ..errors import ConfigError
from ..rundir import FSR_ESTIMATE, RunDir
from .blockwise import batched_layernorms, repeat_blocks
from .distributed import gather_rows
from .evaluate import autocast, batches
from .metrics import classification_metrics

DEFAULT_GRID = tuple(round(0.25 * i, 2) for i in range(13))  # 0, 0.25, ..., 3
VALIDATION = "val"


@dataclass
class LambdaCurve:
    grid: list[float]
    metrics: list[dict[str, float]]
    chosen: float
    target: str
    split: str
    seconds: float
    forward_passes: int

    def to_dict(self) -> dict:
        return {
            "lambda": self.chosen,
            "target": self.target,
            "selected_on": self.split,
            "criterion": "validation accuracy; ties -> lambda closest to 1",
            "curve": [{"lambda": lam, **m} for lam, m in zip(self.grid, self.metrics, strict=True)],
            "cost": {"seconds": round(self.seconds, 3), "batched_forward_passes": self.forward_passes},
        }


def require_validation(dataset: object) -> None:
    """The guard: lambda may only be chosen on a dataset that the pipeline tagged as the validation split."""
    split = getattr(dataset, "split", None)
    if split != VALIDATION:
        raise ConfigError(
            f"lambda is selected on the validation split only; this dataset is tagged {split!r}. "
            "Test splits are for reporting, never for selection."
        )


@torch.inference_mode()
def grid_logits(
    model: nn.Module,
    norms: Sequence[str],
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    grid: Sequence[float],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "auto",
    target: str = "gamma",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits (len(grid), N, classes) of every rescaled model, labels (N,), and the number of batched passes."""
    stacks = {k: v.to(device) for k, v in rescale_batch(base, tuned, norms, list(grid), target).items()}
    n = len(grid)
    logits, labels = [], []
    was_training = model.training
    model.eval()
    with batched_layernorms(model, norms, stacks, n), autocast(device, precision):
        for x, y in batches(loader, device, f"lambda grid ({n} values)", progress):
            logits.append(model(repeat_blocks(x, n)).float().view(n, x.shape[0], -1).cpu())
            labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits, dim=1), torch.cat(labels), len(labels)


def choose(grid: Sequence[float], metrics: Sequence[dict[str, float]]) -> float:
    """Best validation accuracy; among ties the lambda closest to 1 (the least change to the tuned model)."""
    best = max(m["accuracy"] for m in metrics)
    return min((lam for lam, m in zip(grid, metrics, strict=True) if m["accuracy"] == best), key=lambda v: abs(v - 1))


def select_lambda(
    model: nn.Module,
    norms: Sequence[str],
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    val_dataset: torch.utils.data.Dataset | DeviceImages,
    num_classes: int,
    device: torch.device,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    target: str = "gamma",
    batch_size: int = 256,
    precision: str = "auto",
    progress: bool = False,
) -> LambdaCurve:
    """Score the grid on the validation split and pick lambda; refuses any split but validation."""
    require_validation(val_dataset)
    if not grid:
        raise ConfigError("--lambda-grid is empty")
    per_pass = max(1, batch_size // len(grid))
    loader = eval_batches(val_dataset, per_pass)
    start = time.perf_counter()
    logits, labels, passes = grid_logits(model, norms, base, tuned, grid, loader, device, precision, target, progress)
    logits, labels = gather_rows(logits.transpose(0, 1)).transpose(0, 1), gather_rows(labels)  # data-parallel
    metrics = [classification_metrics(lk.numpy(), labels.numpy(), num_classes) for lk in logits]
    seconds = time.perf_counter() - start
    return LambdaCurve(list(grid), metrics, choose(grid, metrics), target, VALIDATION, seconds, passes)


def lambda_record(curve: LambdaCurve | None, lam: str, run: RunDir, target: str = "gamma") -> dict:
    """lambda.json content: lambda from the validation curve ('auto'), given, or from FSR_est ('fsr'), and
    the curve with its best value when one was scored (`target` is the curve's when there is one)."""
    if curve is None:
        if lam == "auto":
            raise ConfigError("--lambda auto chooses on the validation grid: score it")
        record: dict = {"lambda": None, "target": target}
    else:
        record = {**curve.to_dict(), "best_on_validation": curve.chosen}
    if lam == "fsr":
        record["lambda"] = run.read_json(FSR_ESTIMATE)["lambda"]
        record["selected_on"] = "training data (FSR estimate)" + (
            "; the validation curve is recorded, not used" if curve is not None else ""
        )
    elif lam != "auto":
        try:
            record["lambda"] = float(lam)
        except ValueError:
            raise ConfigError(f"--lambda must be a number, 'auto' or 'fsr', got {lam!r}") from None
        record["selected_on"] = "given"
    return record


def parse_grid(text: str) -> list[float]:
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"--lambda-grid must be comma-separated numbers, got {text!r}") from e
    if not grid:
        raise ConfigError("--lambda-grid is empty")
    return grid
