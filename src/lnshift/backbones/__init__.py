"""ViT backbones of three families behind one interface, and `load_backbone` to resolve a model name."""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import timm

from ..errors import ModelError
from . import registry
from .base import Backbone, find_norms, norm_table, stored_data_config
from .fastpath import apply_fast_paths, resolve_fast_paths
from .hf_backbone import load_hf
from .openclip_backbone import load_open_clip
from .registry import ModelSpec, close_matches, register
from .timm_backbone import load_timm

__all__ = [
    "Backbone",
    "ModelSpec",
    "find_norms",
    "load_backbone",
    "norm_table",
    "register",
    "resolve_fast_paths",
]

_LOADERS = {"timm": load_timm, "hf": load_hf, "open_clip": load_open_clip}


def _folder_kind(folder: Path) -> str:
    """'hf' for an HF model folder (`model_type`), 'timm' for a timm hub folder (`architecture`)."""
    file = folder / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"model folder {folder}: cannot read {file.name}: {err}") from err
    if isinstance(cfg, dict) and "model_type" in cfg:
        return "hf"
    if isinstance(cfg, dict) and "architecture" in cfg:
        return "timm"
    raise ModelError(f"{file} has neither 'model_type' (HF) nor 'architecture' (timm)")


def _load_spec(spec: ModelSpec, weights: str | None, pretrained: bool, model_kwargs: dict[str, Any]) -> Backbone:
    """Weights precedence: the user's file, then the bundled asset, then the hub cache, else random.

    Without weights (an architecture only, as `lnshift inspect` builds it) a bundled model still reports
    the preprocessing stored with its weights, the one it trains with.
    """
    data_config = spec.data_config
    if spec.weights and weights is None:
        bundled = Path(str(resources.files("lnshift") / "assets" / spec.weights))
        if pretrained:
            weights = str(bundled)
        else:
            data_config = {**data_config, **stored_data_config(bundled)}
    from_hub = weights is None and pretrained and spec.hub_id is not None
    return _LOADERS[spec.source](
        spec.hub_id if from_hub else spec.arch,
        weights,
        pretrained=from_hub,
        model_kwargs={**spec.model_kwargs, **model_kwargs},
        data_config=data_config,
    )


def _unknown(name: str) -> ModelError:
    hints = close_matches(name) + close_matches(name, timm.list_models())
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    return ModelError(
        f"unknown model {name!r}: not an lnshift name, a timm model or a model folder{hint} "
        "(HF folders: hf:PATH, open_clip: open_clip:ARCH)"
    )


def load_backbone(
    name: str,
    weights: str | None = None,
    *,
    pretrained: bool = True,
    model_kwargs: dict | None = None,
    fast_paths: Iterable[str] = (),
) -> Backbone:
    """Resolve `name` and load the backbone, in eval mode and with its preprocessing in `data_config`.

    Order: lnshift registry name; `hf:PATH` or a folder whose config.json has `model_type`;
    `open_clip:ARCH`; a timm-format folder; otherwise a timm model name (`hf-hub:` included).
    `weights` (file or folder) replaces the library's own pretrained weights. `fast_paths` (names of
    config.FAST_PATHS, e.g. from `resolve_fast_paths`) turns on exact speed-ups for CUDA GPUs
    (backbones/fastpath.py); without them the model runs its library's own forward.
    """
    kwargs = dict(model_kwargs or {})
    if name in registry.list_models():
        backbone = _load_spec(registry.get(name), weights, pretrained, kwargs)
    elif name.startswith("hf:"):
        backbone = load_hf(name.removeprefix("hf:"), weights, pretrained=pretrained, model_kwargs=kwargs)
    elif name.startswith("open_clip:"):
        arch = name.removeprefix("open_clip:")
        backbone = load_open_clip(arch, weights, pretrained=pretrained, model_kwargs=kwargs)
    elif Path(name).is_dir():
        loader = _LOADERS[_folder_kind(Path(name))]
        backbone = loader(name, weights, pretrained=pretrained, model_kwargs=kwargs)
    elif name.startswith("hf-hub:") or timm.is_model(name):
        backbone = load_timm(name, weights, pretrained=pretrained, model_kwargs=kwargs)
    else:
        raise _unknown(name)
    backbone.name = name
    apply_fast_paths(backbone, fast_paths)
    return backbone.eval()
