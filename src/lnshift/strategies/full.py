"""`full`: every parameter trains (the upper-cost baseline)."""

from torch import nn

from .base import Strategy, StrategyOptions


class FullStrategy(Strategy):
    name = "full"

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        return [n for n, _ in model.named_parameters()]
