"""Tuning strategies by name: each decides which tensors train; the training loop never asks which one it runs.

Adding a strategy: subclass `Strategy` in a new file and `register` it here.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Strategy, StrategyOptions, norm_module_names, norm_names
from .bitfit import BitFitStrategy
from .full import FullStrategy
from .head import HeadStrategy
from .layernorm import LayerNormOnlyStrategy, LayerNormStrategy
from .lora import LoraStrategy

STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    STRATEGIES[strategy.name] = strategy
    return strategy


for _cls in (
    HeadStrategy,
    LayerNormStrategy,
    LayerNormOnlyStrategy,
    FullStrategy,
    BitFitStrategy,
    LoraStrategy,
):
    register(_cls())


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown tuning strategy {name!r}; registered: {sorted(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyOptions",
    "get_strategy",
    "norm_module_names",
    "norm_names",
    "register",
]
