"""`head`: linear probing, the backbone stays frozen."""

from torch import nn

from .base import Strategy, StrategyOptions, head_names


class HeadStrategy(Strategy):
    name = "head"

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        return head_names(model)
