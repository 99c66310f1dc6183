"""`bitfit`: every bias of the backbone plus the head (Ben Zaken et al., 2022)."""

from torch import nn

from .base import Strategy, StrategyOptions, head_names


class BitFitStrategy(Strategy):
    name = "bitfit"

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        biases = [f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.endswith(".bias")]
        return biases + head_names(model)
