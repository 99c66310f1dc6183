"""open_clip image towers (`open_clip:ARCH` + a weights file): the visual tower only, text tower dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .base import Backbone, load_state_dict_strict, merge_data_config, read_weights
from .registry import close_matches


class OpenCLIPBackbone(Backbone):
    """Pooled = `visual(x)`, the projected image embedding that CLIP zero-shot heads compare with text."""

    family = "open_clip"
    patch_convs = ("conv1", "trunk.patch_embed.proj")  # open_clip's own ViT; a timm trunk

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_tokens(self, x: Tensor) -> Tensor:
        visual = self.model
        if hasattr(visual, "trunk"):  # open_clip TimmModel: a timm ViT trunk plus a projection head
            return visual.trunk.forward_features(x)
        # ln_post normalises the tokens, except with attentional pooling, where it acts after the pooler.
        out = visual.forward_intermediates(
            x,
            indices=1,
            normalize_intermediates=visual.attn_pool is None,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ModelError("open_clip models need open_clip_torch: pip install lnshift[clip]") from err
    return open_clip


def _visual_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The image tower's keys of a full CLIP state dict; a tower-only state dict is returned as is."""
    if any(k.startswith("visual.") for k in state_dict):
        return {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    return state_dict


def load_open_clip(
    arch: str,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> OpenCLIPBackbone:
    """Build open_clip architecture `arch` and load its image tower from `weights`.

    open_clip's pretrained tags download from the hub, so pretrained weights must come as a file
    (full CLIP or visual-only state dict); `pretrained=False` gives a random tower.
    """
    open_clip = _import_open_clip()
    known = open_clip.list_models()
    if arch not in known:
        hint = close_matches(arch, known)
        raise ModelError(
            f"unknown open_clip architecture {arch!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
        )
    if pretrained and weights is None:
        raise ModelError(
            f"open_clip:{arch} needs a weights file (--weights FILE, full CLIP or visual state dict); "
            "pass pretrained=False for random init"
        )
    kwargs = dict(model_kwargs or {})
    try:
        # pretrained_hf=False: never fetch a HF text tower's weights, the text tower is dropped anyway.
        clip = open_clip.create_model(arch, pretrained=None, pretrained_hf=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, OSError) as err:
        raise ModelError(f"cannot build open_clip model {arch!r} with {kwargs}: {err}") from err
    visual: nn.Module = clip.visual
    if hasattr(visual, "trunk"):
        token_dim = visual.trunk.num_features
    elif hasattr(visual, "transformer"):
        token_dim = visual.transformer.width
    else:
        raise ModelError(f"open_clip:{arch} has a {type(visual).__name__} image tower, not a ViT")

    weights_config: dict[str, Any] = {}
    if weights is not None:
        state_dict, weights_config = read_weights(weights)
        load_state_dict_strict(visual, _visual_state_dict(state_dict), f"open_clip:{arch} visual", str(weights))

    pp = open_clip.get_model_preprocess_cfg(clip)
    size = pp["size"]
    defaults = {
        "input_size": (3, *((size, size) if isinstance(size, int) else size)),
        "mean": pp["mean"],
        "std": pp["std"],
        "interpolation": pp.get("interpolation", "bicubic"),
        # open_clip resizes the shortest side to the input size and crops ("shortest") or squashes.
        "crop_pct": 1.0,
        "crop_mode": "squash" if pp.get("resize_mode") == "squash" else "center",
    }
    return OpenCLIPBackbone(
        visual,
        f"open_clip:{arch}",
        feature_dim=kwargs.get("embed_dim", open_clip.get_model_config(arch)["embed_dim"]),
        token_dim=token_dim,
        data_config=merge_data_config(defaults, data_config, weights_config),
    )
