"""The one training loop: runs any phase of any method and knows nothing about which method it serves.

A phase trains exactly the tensors its strategy selected (everything else has requires_grad False),
with AdamW, a warm-up + cosine schedule, optional bf16 autocast and label smoothing; in a data-parallel
run the gradient is that of the mean loss over the global batch (distributed.py). After every
epoch it scores the validation split (never a test split), keeps the best trainable state, and
writes a checkpoint from which an interrupted run resumes at the next epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from ..config import FitConfig
from ..errors import LNShiftError
from ..rundir import EventLog
from . import distributed as dist
from .evaluate import autocast, batches
from .phases import Phase


class NonFiniteLossError(LNShiftError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class PhasePlan:
    index: int
    phase: Phase
    trainable: list[str]
    steps: int


@dataclass
class PhaseState:
    """Everything needed to continue a phase after an interruption."""

    epoch: int = 0
    step: int = 0
    best_score: tuple[float, float] | None = None
    best_epoch: int = -1
    best_tensors: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict | None = None

    def pack(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and a JSON-able rest: a checkpoint that loads without unpickling (running) anything.

        Tensors are named `best/<parameter>` and `optimizer/<index>/<key>` (AdamW's per-parameter
        state is all tensors); the optimizer's param_groups are plain numbers and go to JSON.
        """
        tensors = {f"best/{n}": t for n, t in (self.best_tensors or {}).items()}
        for index, values in (self.optimizer or {}).get("state", {}).items():
            tensors.update({f"optimizer/{index}/{key}": t for key, t in values.items()})
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "has_best": self.best_tensors is not None,
            "history": self.history,
            "param_groups": None if self.optimizer is None else self.optimizer["param_groups"],
        }
        return tensors, record

    @classmethod
    def unpack(cls, tensors: Mapping[str, torch.Tensor], record: dict[str, Any]) -> PhaseState:
        """The state `pack` stored; JSON's lists become the tuple and int keys the code compares and looks up."""
        best = {n.removeprefix("best/"): t for n, t in tensors.items() if n.startswith("best/")}
        optimizer = None
        if record["param_groups"] is not None:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for name, t in tensors.items():
                if name.startswith("optimizer/"):
                    _, index, key = name.split("/", 2)
                    state.setdefault(int(index), {})[key] = t
            optimizer = {"state": state, "param_groups": record["param_groups"]}
        score = record["best_score"]
        return cls(
            epoch=record["epoch"],
            step=record["step"],
            best_score=None if score is None else (score[0], score[1]),
            best_epoch=record["best_epoch"],
            best_tensors=best if record["has_best"] else None,
            history=record["history"],
            optimizer=optimizer,
        )


def set_trainable(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze exactly `names` (in that order)."""
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise LNShiftError(f"strategy selected unknown parameters: {unknown[:5]}")
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    return [params[n] for n in names]


def store_frozen(model: nn.Module, trained: list[str], dtype: torch.dtype) -> int:
    """Keep every parameter outside `trained` in `dtype`; returns how many values changed storage.

    Under bf16 autocast the matrix products read bf16 anyway; frozen weights stored in bf16 also keep
    the residual stream and the saved activations in bf16, which saves memory traffic. Trained
    tensors stay float32, so AdamW's small updates are not rounded away.
    """
    keep = set(trained)
    changed = 0
    for name, p in model.named_parameters():
        if name not in keep and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed += p.numel()
    return changed


def param_groups(
    model: nn.Module | Mapping[str, nn.Parameter],
    names: list[str],
    weight_decay: float,
    decay_1d: bool,
    run_axis: bool = False,
) -> list[dict]:
    """Weight decay on matrices only unless `decay_1d`: LayerNorm gains and biases are not pulled to 0.

    `model` may be a mapping of named parameters; `run_axis`: their first dimension stacks independent
    runs (batched.py) and does not make a gain a matrix.
    """
    params = model if isinstance(model, Mapping) else dict(model.named_parameters())
    is_decayed = {n: decay_1d or params[n].ndim - run_axis > 1 for n in names}
    decay = [params[n] for n in names if is_decayed[n]]
    no_decay = [params[n] for n in names if not is_decayed[n]]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, cfg: FitConfig, step: int = 0) -> CosineLRScheduler:
    """Linear warm-up over `cfg.optim.warmup` of the phase's steps, then cosine to 1 % of the peak; set to `step`."""
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=steps,
        warmup_t=int(cfg.optim.warmup * steps),
        warmup_lr_init=cfg.optim.lr * 0.01,
        lr_min=cfg.optim.lr * 0.01,
        t_in_epochs=False,
    )
    scheduler.step_update(step)
    return scheduler


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def restore(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, phase: int, epoch: int) -> int:
    """Data order, augmentation and dropout of an epoch depend only on (seed, phase, epoch): resumable."""
    return (seed * 1_000_003 + phase * 10_007 + epoch) % 2**31


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """One optimiser step on the mean of `loss_fn` (a summed loss) over the global batch.

    Returns [summed loss, sample count] of the global batch, detached and left on the device: no host
    sync. In a data-parallel run both are all-reduced (asynchronously on GPUs), so every rank sees the
    same numbers; scaling by world / count makes DDP's averaged gradient the global batch's mean, also
    when slices are uneven. Placeholder samples (label distributed.IGNORE) count for nothing. The loss
    is computed in float32 at least: bf16 logits are upcast, float64 ones are kept.
    """
    with autocast(device, precision):
        logits = forward(x)
        loss = loss_fn(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
    stats = dist.all_sum(torch.stack([loss.detach(), (y != dist.IGNORE).sum().to(loss.dtype)]))
    optimizer.zero_grad(set_to_none=True)
    (loss * (dist.world() / stats[1])).backward()
    optimizer.step()
    return stats


def run_phase(
    model: nn.Module,
    plan: PhasePlan,
    cfg: FitConfig,
    train_loader: Callable[[torch.Generator], DataLoader],
    validate: Callable[[], dict[str, float]],
    device: torch.device,
    log: EventLog,
    save_checkpoint: Callable[[PhaseState], None],
    state: PhaseState | None = None,
) -> PhaseState:
    """Train one phase to its step budget; `state` continues an interrupted phase."""
    state = state or PhaseState()
    params = set_trainable(model, plan.trainable)
    optimizer = torch.optim.AdamW(
        param_groups(model, plan.trainable, cfg.optim.weight_decay, cfg.optim.decay_1d), lr=cfg.optim.lr
    )
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    scheduler = cosine_schedule(optimizer, plan.steps, cfg, state.step)
    net = dist.wrap(model, device)  # after set_trainable: DDP reduces exactly this phase's tensors
    step_forward = torch.compile(net) if cfg.runtime.compile else net  # shares the parameters; validation stays eager
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing, reduction="sum")
    n_train = sum(p.numel() for p in params)
    log.info(
        f"phase {plan.phase.name} ({plan.phase.strategy}): {plan.steps} steps, {n_train:,} trainable values, "
        f"decay on 1-D parameters: {'yes' if cfg.optim.decay_1d else 'no'}"
    )
    model.train()
    while state.step < plan.steps:
        seed = epoch_seed(cfg.optim.seed, plan.index, state.epoch)
        generator = torch.Generator().manual_seed(seed)
        seed_everything(seed)  # timm's crops draw from `random`
        first_step, losses = state.step, []
        desc = f"{plan.phase.name} epoch {state.epoch + 1}"
        for x, y in batches(train_loader(generator), device, desc, cfg.runtime.progress):
            losses.append(train_step(step_forward, x, y, optimizer, loss_fn, device, cfg.optim.precision))
            state.step += 1
            scheduler.step_update(state.step)
            if state.step >= plan.steps:
                break
        # read the losses once per epoch: a host sync per step would stall the GPU's queue
        sums, counts = (torch.stack(losses).double().cpu() if losses else torch.zeros(0, 2, dtype=torch.float64)).T
        bad = (~torch.isfinite(sums)).nonzero()
        if len(bad):  # every rank holds the same all-reduced numbers, so all of them stop here
            k = int(bad[0])
            raise NonFiniteLossError(
                f"loss is {(sums[k] / counts[k]).item()} at step {first_step + k + 1} of phase {plan.phase.name}; "
                "the last good checkpoint is kept (lower --lr or check the data)"
            )
        loss_sum, seen = float(sums.sum()), float(counts.sum())
        state.epoch += 1
        val = validate()
        record = {
            "phase": plan.phase.name,
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": loss_sum / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "val_accuracy": val["accuracy"],
            "val_loss": val["loss"],
        }
        state.history.append(record)
        log.event("epoch", **record)
        log.info(
            f"{plan.phase.name} epoch {state.epoch}: train loss {record['train_loss']:.4f}, "
            f"val acc {val['accuracy']:.4f}, val loss {val['loss']:.4f}"
        )
        score = (val["accuracy"], -val["loss"] if math.isfinite(val["loss"]) else -math.inf)
        if cfg.optim.select == "last" or state.best_score is None or score > state.best_score:
            state.best_score, state.best_epoch = score, state.epoch
            state.best_tensors = snapshot(model, plan.trainable)
        state.optimizer = optimizer.state_dict()
        save_checkpoint(state)
    if state.best_tensors is not None:
        restore(model, state.best_tensors)
    how = "selected on validation" if cfg.optim.select == "best" else "the last one, --select last"
    log.info(f"phase {plan.phase.name}: kept epoch {state.best_epoch} ({how})")
    return state
