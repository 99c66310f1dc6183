"""Classification heads on top of a backbone, and the classifier that joins the two.

A head either reads the pooled feature (`linear`, `mlp`) or the token sequence (`attention`, the
revised paper's attention pooling); the classifier asks the backbone for what the head needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError

HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return wrap


@register_head("linear")
class LinearHead(nn.Module):
    uses_tokens = False

    def __init__(self, feature_dim: int, token_dim: int, num_classes: int, **_: object) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_head("mlp")
class MLPHead(nn.Module):
    uses_tokens = False

    def __init__(
        self,
        feature_dim: int,
        token_dim: int,
        num_classes: int,
        hidden: int = 0,
        dropout: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        hidden = hidden or 2 * feature_dim
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_head("attention")
class AttentionPoolHead(nn.Module):
    """A learned query attends over all tokens; `hidden` widens the pooled feature before the classifier."""

    uses_tokens = True

    def __init__(
        self,
        feature_dim: int,
        token_dim: int,
        num_classes: int,
        hidden: int = 0,
        heads: int = 4,
        dropout: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        if token_dim % heads:
            heads = 1
        self.query = nn.Parameter(torch.zeros(1, 1, token_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(token_dim, heads, batch_first=True)
        hidden = hidden or 2 * token_dim
        self.expand = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return self.fc(self.expand(pooled[:, 0]))


def build_head(name: str, feature_dim: int, token_dim: int, num_classes: int, **options: object) -> nn.Module:
    if name not in HEADS:
        raise ConfigError(f"unknown --head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](feature_dim, token_dim, num_classes, **options)


class Classifier(nn.Module):
    """Backbone plus head. Parameter names (`backbone.model.*`, `head.*`) are the names in every artifact."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.head, "uses_tokens", False):
            return self.head(self.backbone.forward_tokens(x))
        return self.head(self.backbone(x))
