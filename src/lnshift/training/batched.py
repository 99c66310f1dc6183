"""R independent runs of one method trained together over the shared frozen backbone, in one batch.

Run r's images are block r of an R x B batch. Every LayerNorm scales and shifts block r with run r's
(gamma, beta) (blockwise.py) and run r's head classifies it (the head's own forward, vmapped over
stacked parameters). The loss is the sum over runs of each run's mean loss, so the gradient of the
r-th slice of a stacked (R, ...) parameter is exactly run r's own gradient; AdamW, its weight decay
and the learning-rate schedule act elementwise, so each slice takes the step its run would take
alone (equal up to float reduction order; docs/multirun.md).

Supported: methods whose phases train the head, the LayerNorms or both (`lp`, `ln`, `lp-ln`,
`cyclic`, `cyclic-kx`) with any head (the attention head through vmap's slower per-run fallback of attention).
train_runs takes a fixed step budget (`steps`) and gives the trained tensors; multirun.py trains configs
with it and writes their run directories.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..config import FitConfig
from ..errors import ConfigError
from .blockwise import batched_layernorms, repeat_blocks
from .evaluate import autocast
from .heads import Classifier
from .ingredients import build_model, plan_phases, trained_names
from .loop import (
    PhasePlan,
    cosine_schedule,
    param_groups,
    restore,
    run_phase,
    set_trainable,
    snapshot,
    train_step,
)
from .phases import phases_for

BATCHABLE = ("head", "layernorm", "ln")
HEAD = "head."

# step -> one (x, y) per run, all of the same batch size; steps count over all phases of the method
Batches = Callable[[int], Sequence[tuple[Tensor, Tensor]]]


def batched_plans(model: Classifier, cfg: FitConfig) -> list[PhasePlan]:
    """fit's phases and budget split, for a method whose phases train only heads and LayerNorms."""
    if cfg.optim.steps is None:
        raise ConfigError("batched runs need a fixed step budget: set steps")
    if cfg.method.lambda_each_cycle:
        raise ConfigError("batched runs do not rescale between cycles (lambda_each_cycle)")
    plans = plan_phases(model, cfg, cfg.optim.steps)
    other = sorted({p.phase.strategy for p in plans} - set(BATCHABLE))
    if other:
        raise ConfigError(f"method {cfg.method.name} trains {other}; batched runs train only {list(BATCHABLE)}")
    return plans


def norms_of(names: Sequence[str]) -> list[str]:
    """The norm modules whose affine parameters are among `names` (every name that is not the head's)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names if not n.startswith(HEAD)))


def initial_states(
    cfg: FitConfig, backbone: nn.Module, num_classes: int, seeds: Sequence[int]
) -> list[dict[str, Tensor]]:
    """Each run's starting tensors as fit() initialises a run with that seed: the backbone's norms, a seeded head."""
    states = []
    shortest = cfg.replace(
        steps=len(phases_for(cfg.method.name, cfg.method.cycles))
    )  # the tensors do not depend on the budget
    for seed in seeds:
        model = build_model(cfg.replace(seed=seed), backbone, num_classes)
        states.append(snapshot(model, trained_names(batched_plans(model, shortest))))
    return states


class StackedHead(nn.Module):
    """R copies of a head, block r of the batch through copy r: the head's own forward vmapped over (R, ...) stacks.

    `stacks` maps the model's names (`head.fc.weight`, ...) to stacks; it is read at every call, so the
    caller may replace its entries between steps.
    """

    def __init__(self, head: nn.Module, stacks: Mapping[str, Tensor], n_runs: int) -> None:
        super().__init__()
        self.head = head
        self.stacks = stacks  # owned by the caller, so not registered here
        self.n_runs = n_runs
        self.uses_tokens = getattr(head, "uses_tokens", False)

    def forward(self, x: Tensor) -> Tensor:
        def one(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.head, params, (x,))

        params = {n.removeprefix(HEAD): t for n, t in self.stacks.items() if n.startswith(HEAD)}
        return vmap(one, randomness="different")(params, x.unflatten(0, (self.n_runs, -1))).flatten(0, 1)


@contextlib.contextmanager
def stacked_runs(model: Classifier, stacks: Mapping[str, Tensor], n_runs: int) -> Iterator[None]:
    """Within, `model` maps an (n_runs x B) batch to (n_runs x B) logits, block r through run r's tensors.

    `stacks` maps fit's tensor names (`backbone.model.blocks.0.norm1.weight`, `head.fc.weight`, ...) to
    (n_runs, ...) stacks; tensors without a stack are the model's own, shared by every run.
    """
    head = model.head
    model.head = StackedHead(head, stacks, n_runs)
    try:
        with batched_layernorms(model, norms_of(list(stacks)), stacks, n_runs):
            yield
    finally:
        model.head = head


def concat(pairs: Sequence[tuple[Tensor, Tensor]], n_runs: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The runs' batches as one: run r's images become block r."""
    if len(pairs) != n_runs or len({len(y) for _, y in pairs}) != 1:
        raise ConfigError(f"batch(step) must give {n_runs} (x, y) pairs of one batch size")
    x = torch.cat([x for x, _ in pairs]).to(device, non_blocking=True)
    return x, torch.cat([y for _, y in pairs]).to(device, non_blocking=True)


def train_runs(
    model: Classifier,
    starts: Sequence[Mapping[str, Tensor]],
    batch: Batches,
    cfg: FitConfig,
    device: torch.device,
    lrs: Sequence[float] | None = None,
) -> list[dict[str, Tensor]]:
    """Train len(starts) runs of `cfg.method.name` together for `cfg.optim.steps` steps; returns their trained tensors.

    `starts[r]` holds run r's initial values (see `initial_states`), `batch(step)` its batches, `lrs[r]`
    its peak learning rate (default: all `cfg.optim.lr`; a learning-rate grid trains in one pass). The result
    has fit's adapter names; a run that diverged has non-finite values (`diverged`) and harms no other
    run. Other optimiser settings come from `cfg` (weight_decay, decay_1d, warmup, label_smoothing,
    precision); the model's own tensors are frozen and left unchanged.
    """
    plans = batched_plans(model, cfg)
    names = trained_names(plans)
    n = len(starts)
    lrs = [cfg.optim.lr] * n if lrs is None else list(lrs)
    if len(lrs) != n:
        raise ConfigError(f"train_runs: {len(lrs)} learning rates for {n} runs")
    # runs of one learning rate share an optimiser and schedule; their stacks are joined for each forward
    groups = {lr: [r for r in range(n) if lrs[r] == lr] for lr in dict.fromkeys(lrs)}
    order = [r for members in groups.values() for r in members]
    own = [
        {k: nn.Parameter(torch.stack([starts[r][k] for r in members]).to(device)) for k in names}
        for members in groups.values()
    ]
    stacks: dict[str, Tensor] = {}  # read by the patched model at every forward

    def join() -> None:
        stacks.update({k: own[0][k] if len(own) == 1 else torch.cat([g[k] for g in own]) for k in names})

    join()
    set_trainable(model, [])
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing, reduction="sum")

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        # train_step divides by the n * B samples: n * sum / (n * B) is the sum of the runs' mean
        # losses, so each run gets exactly its own gradient
        return ce(logits, y) * n

    model.train()
    step = 0
    with stacked_runs(model, stacks, n):
        for plan in plans:
            optimizers, schedulers = [], []
            for lr, params in zip(groups, own, strict=True):
                for k, p in params.items():
                    p.requires_grad_(k in plan.trainable)
                groups_ = param_groups(
                    params, plan.trainable, cfg.optim.weight_decay, cfg.optim.decay_1d, run_axis=True
                )
                optimizers.append(torch.optim.AdamW(groups_, lr=lr))
                schedulers.append(cosine_schedule(optimizers[-1], plan.steps, cfg.replace(lr=lr)))
            together = _Optimizers(optimizers)
            for i in range(plan.steps):
                pairs = batch(step)
                join()
                x, y = concat([pairs[r] for r in order], n, device)
                train_step(model, x, y, together, loss_fn, device, cfg.optim.precision)
                step += 1
                for scheduler in schedulers:
                    scheduler.step_update(i + 1)
    tuned: dict[int, dict[str, Tensor]] = {}
    for members, params in zip(groups.values(), own, strict=True):
        for j, r in enumerate(members):
            tuned[r] = {k: t[j].detach().clone() for k, t in params.items()}
    return [tuned[r] for r in range(n)]


class _Optimizers:
    """Several optimisers stepped as one (train_step's optimizer): one per learning rate of a batched pass."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def diverged(states: Sequence[Mapping[str, Tensor]]) -> list[int]:
    """The runs whose trained tensors are not all finite."""
    return [r for r, s in enumerate(states) if not all(bool(torch.isfinite(t).all()) for t in s.values())]


@torch.inference_mode()
def run_logits(
    model: Classifier, states: Sequence[Mapping[str, Tensor]], x: Tensor, device: torch.device, precision: str = "auto"
) -> Tensor:
    """Logits (R, N, classes) of every run on the same N images, in one batched pass."""
    n = len(states)
    stacks = {k: torch.stack([s[k] for s in states]).to(device) for k in states[0]}
    was_training = model.training
    model.eval()
    with stacked_runs(model, stacks, n), autocast(device, precision):
        logits = model(repeat_blocks(x.to(device), n)).float()
    model.train(was_training)
    return logits.unflatten(0, (n, -1))


class _NoLog:
    """run_phase's log, silenced: a reference run writes no run directory."""

    def info(self, message: str) -> None:
        pass

    def event(self, kind: str, **data: object) -> None:
        pass


def train_alone(
    model: Classifier,
    start: Mapping[str, Tensor],
    batch: Callable[[int], tuple[Tensor, Tensor]],
    cfg: FitConfig,
    device: torch.device,
) -> dict[str, Tensor]:
    """One run the plain way, loop.run_phase per phase: what train_runs must equal, and its cost baseline.

    Same arguments as train_runs for a single run; the model's tensors are restored afterwards.
    """
    plans = batched_plans(model, cfg)
    names = trained_names(plans)
    kept = snapshot(model, names)
    restore(model, start)
    quiet = cfg.replace(select="last", progress=False)
    step = 0
    for plan in plans:

        def loader(_generator: torch.Generator, first: int = step, steps: int = plan.steps) -> Iterator:
            return (batch(first + i) for i in range(steps))  # one epoch of exactly the phase's steps

        run_phase(model, plan, quiet, loader, lambda: {"accuracy": 0.0, "loss": 0.0}, device, _NoLog(), lambda _: None)
        step += plan.steps
    trained = snapshot(model, names)
    restore(model, kept)
    return trained
