"""What a tuning strategy is: a rule that picks the tensors that train (and may add some, like LoRA)."""

from __future__ import annotations

from torch import nn

from ..config import StrategyOptions  # the options strategies read: a part of a run's method section


class Strategy:
    """Base class: subclasses set `name` and implement `select`; `prepare` may add modules (once)."""

    name: str = ""

    def prepare(self, model: nn.Module, options: StrategyOptions) -> None:
        """Change the model before training (default: nothing). Must be idempotent."""

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        """Names of the classifier parameters that train in this strategy."""
        raise NotImplementedError


def head_names(model: nn.Module) -> list[str]:
    return [f"head.{n}" for n, _ in model.head.named_parameters()]


def norm_module_names(model: nn.Module, options: StrategyOptions) -> list[str]:
    """LayerNorm modules of the backbone (found by type), as classifier-level module names."""
    return [f"backbone.{n}" for n in model.backbone.norm_modules(include_rms=options.include_rms)]


def norm_names(model: nn.Module, options: StrategyOptions) -> list[str]:
    """Affine parameters of every LayerNorm, plus LayerScale gains when asked for."""
    params = dict(model.named_parameters())
    names = [f"{m}.{p}" for m in norm_module_names(model, options) for p in ("weight", "bias") if f"{m}.{p}" in params]
    if options.include_layerscale:
        names += [f"backbone.{n}" for n in model.backbone.layerscale_parameters()]
    return names
