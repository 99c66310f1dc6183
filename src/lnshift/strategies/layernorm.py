"""`ln` (LayerNorm affine + head, the method) and `layernorm` (LayerNorm only, the cyclic LN phase)."""

from torch import nn

from .base import Strategy, StrategyOptions, head_names, norm_names


class LayerNormOnlyStrategy(Strategy):
    name = "layernorm"

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        return norm_names(model, options)


class LayerNormStrategy(Strategy):
    name = "ln"

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        return norm_names(model, options) + head_names(model)
