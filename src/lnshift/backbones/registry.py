"""Short lnshift model names -> how to build them (library, architecture, kwargs, preprocessing, weights)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError

SOURCES = ("timm", "hf", "open_clip")


@dataclass(frozen=True)
class ModelSpec:
    """A recipe for one named backbone.

    `arch` is what the library builds (timm name, HF folder/repo, open_clip arch); `weights` is a file
    path inside `lnshift/assets/` shipped with the package; `hub_id` is the upstream pretrained source,
    used (from the local cache only) when no weights file is given; `data_config` overrides the
    preprocessing the library reports.
    """

    name: str
    source: str
    arch: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    hub_id: str | None = None
    license: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ModelError(f"model spec {self.name!r}: source {self.source!r} is not one of {SOURCES}")


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a named recipe; names are unique so a name always means one model."""
    if spec.name in _REGISTRY:
        raise ModelError(f"model name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        hint = close_matches(name)
        raise ModelError(f"unknown lnshift model {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    return _REGISTRY[name]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def close_matches(name: str, candidates: list[str] | None = None, n: int = 5) -> list[str]:
    """Registered names (or `candidates`) resembling `name`, best first, for error messages."""
    return difflib.get_close_matches(name, candidates if candidates is not None else list(_REGISTRY), n=n)


register(
    ModelSpec(
        name="lnshift/test-vit",
        source="timm",
        arch="test_vit",
        license="apache-2.0",
        notes="timm's 6-block, 64-wide test ViT with random weights: for tests and dry runs.",
    )
)

register(
    ModelSpec(
        name="lnshift/vit-tiny-cifar10",
        source="timm",
        arch="vit_tiny_patch16_224",
        model_kwargs={
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 192,
            "depth": 6,
            "num_heads": 3,
            "mlp_ratio": 4.0,
            "class_token": False,
            "global_pool": "avg",
        },
        weights="vit-tiny-cifar10.safetensors",
        license="apache-2.0 (weights trained by lnshift on CIFAR-10 train)",
        notes="bundled compact foundation model: 2.7M-parameter ViT, patch 4 at 32 px, supervised on CIFAR-10 "
        "(86.7% test accuracy); recipe in pretrain/README.md. PACS and LC25000 are unseen.",
    )
)
