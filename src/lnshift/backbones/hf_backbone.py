"""HF transformers ViT / DINOv2 / CLIP vision towers, from a local folder or the local hub cache."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .base import Backbone, load_state_dict_strict, merge_data_config, read_weights

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class _ModelType:
    """How to build and call one HF model_type; its image processor defaults apply without a
    preprocessor_config.json.
    """

    cls_name: str
    init_kwargs: dict[str, Any]
    forward_kwargs: dict[str, Any]
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    interpolation: str
    crop_pct: float
    crop_mode: str


_VIT = _ModelType(
    cls_name="ViTModel",
    init_kwargs={"add_pooling_layer": False},
    forward_kwargs={"interpolate_pos_encoding": True},
    norm=INCEPTION,
    interpolation="bilinear",
    crop_pct=1.0,
    crop_mode="squash",
)
_DINOV2 = _ModelType(
    cls_name="Dinov2Model",
    init_kwargs={},
    forward_kwargs={},
    norm=IMAGENET,
    interpolation="bicubic",
    crop_pct=0.875,
    crop_mode="center",
)
_CLIP = _ModelType(
    cls_name="CLIPVisionModel",
    init_kwargs={},
    forward_kwargs={"interpolate_pos_encoding": True},
    norm=OPENAI_CLIP,
    interpolation="bicubic",
    crop_pct=1.0,
    crop_mode="center",
)
MODEL_TYPES = {
    "vit": _VIT,
    "dinov2": _DINOV2,
    "dinov2_with_registers": replace(_DINOV2, cls_name="Dinov2WithRegistersModel"),
    "clip": _CLIP,
    "clip_vision_model": _CLIP,
}


class HFBackbone(Backbone):
    """ViT / DINOv2: pooled = CLS token of `last_hidden_state` (already after the final layernorm)."""

    family = "hf"
    # ViT and DINOv2; CLIP (transformers 5.x, then 4.x)
    patch_convs = (
        "embeddings.patch_embeddings.projection",
        "embeddings.patch_embedding",
        "vision_model.embeddings.patch_embedding",
    )

    def __init__(self, model: nn.Module, name: str, *, forward_kwargs: dict[str, Any], **dims: Any) -> None:
        super().__init__(model, name, **dims)
        self.forward_kwargs = forward_kwargs

    def _output(self, x: Tensor) -> Any:
        return self.model(pixel_values=x, **self.forward_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self._output(x).last_hidden_state[:, 0]

    def forward_tokens(self, x: Tensor) -> Tensor:
        return self._output(x).last_hidden_state


class HFCLIPBackbone(HFBackbone):
    """CLIP vision: HF leaves `last_hidden_state` un-normalised and applies `post_layernorm` to CLS only.

    Pooled = `pooler_output` (post_layernorm(CLS), before the projection); tokens get the same norm.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._output(x).pooler_output

    def forward_tokens(self, x: Tensor) -> Tensor:
        # transformers 5.x moved CLIPVisionModel's layers off `vision_model`; support both layouts.
        post_layernorm = getattr(self.model, "vision_model", self.model).post_layernorm
        return post_layernorm(self._output(x).last_hidden_state)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ModelError("HF models need transformers: pip install lnshift[hf]") from err
    return transformers


def _check_source(path: str) -> None:
    """A folder that is not there fails here, naming it, not deep in the hub client as a malformed repo id."""
    if Path(path).is_dir():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelError(f"HF model folder not found: {path!r} (nor is it a hub repo id, namespace/name)") from None


def _local_file(path: str, filename: str) -> Path | None:
    """`filename` of a local folder, or of a hub repo if it is in the local cache (never downloads)."""
    if Path(path).is_dir():
        file = Path(path) / filename
        return file if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, filename)
    return Path(found) if isinstance(found, str) else None


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


def _processor_data_config(file: Path) -> dict[str, Any]:
    """Translate an HF image processor config into timm-style preprocessing keys."""
    try:
        pp = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read image processor config {file}: {err}") from err
    out: dict[str, Any] = {}
    if "image_mean" in pp:
        out["mean"], out["std"] = pp["image_mean"], pp["image_std"]
    if pp.get("resample") in PIL_RESAMPLE:
        out["interpolation"] = PIL_RESAMPLE[pp["resample"]]
    size, crop = pp.get("size"), pp.get("crop_size")
    if crop is not None and pp.get("do_center_crop", True):
        out["input_size"] = (3, *_hw(crop))
        shortest = size if isinstance(size, int) else (size or {}).get("shortest_edge")
        out["crop_pct"] = _hw(crop)[0] / shortest if shortest else 1.0
        out["crop_mode"] = "center"
    elif size is not None:
        out["input_size"] = (3, *_hw(size))
        out["crop_pct"] = 1.0
        out["crop_mode"] = "center" if isinstance(size, dict) and "shortest_edge" in size else "squash"
    return out


def load_hf(
    path: str,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> HFBackbone:
    """Load the vision model at `path` (folder or cached repo id) with `local_files_only=True`.

    `model_kwargs` override config values (e.g. `image_size`); `pretrained=False` keeps the
    architecture but initialises randomly; `weights` replaces the folder's weights with a state dict.
    A `model_type` in `model_kwargs` (as registry entries give) lets the architecture be built from
    `model_kwargs` alone when `path` is not available locally, so `weights` work fully offline.
    """
    transformers = _import_transformers()
    _check_source(path)
    kwargs = dict(model_kwargs or {})
    fallback_type = kwargs.pop("model_type", None)
    try:
        model_type = transformers.AutoConfig.from_pretrained(path, local_files_only=True).model_type
        local_config = True
    except (OSError, ValueError) as err:
        if fallback_type is None or (pretrained and weights is None):
            hint = "pass a weights file (--weights FILE) or pretrained=False; " if fallback_type else ""
            raise ModelError(f"cannot read HF model config of {path!r} (local files only): {hint}{err}") from err
        model_type, local_config = fallback_type, False
    if model_type not in MODEL_TYPES:
        raise ModelError(f"HF model {path!r} has model_type {model_type!r}; supported: {sorted(MODEL_TYPES)}")
    spec = MODEL_TYPES[model_type]
    cls = getattr(transformers, spec.cls_name)
    try:
        if local_config:
            config = cls.config_class.from_pretrained(path, local_files_only=True, **kwargs)
        else:
            config = cls.config_class(**kwargs)
        if pretrained and weights is None:
            model, info = cls.from_pretrained(
                path,
                config=config,
                local_files_only=True,
                dtype=torch.float32,
                output_loading_info=True,
                **spec.init_kwargs,
            )
        else:
            model, info = cls(config, **spec.init_kwargs), {}
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot load HF model {path!r} as {spec.cls_name}: {err}") from err
    # from_pretrained only warns about missing weights; a mask token unused at inference may be absent.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("mask_token"))
    if missing:
        raise ModelError(f"HF model {path!r} lacks weights for {spec.cls_name}: {missing[:10]} ({len(missing)} keys)")
    weights_config: dict[str, Any] = {}
    if weights is not None:
        state_dict, weights_config = read_weights(weights)
        load_state_dict_strict(model, state_dict, f"HF {spec.cls_name} {path!r}", str(weights))

    size = config.image_size
    defaults = {
        "input_size": (3, *((size, size) if isinstance(size, int) else size)),
        "mean": spec.norm[0],
        "std": spec.norm[1],
        "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct,
        "crop_mode": spec.crop_mode,
    }
    processor = _local_file(path, "preprocessor_config.json")
    processor_config = _processor_data_config(processor) if processor else {}
    backbone_cls = HFCLIPBackbone if spec.cls_name == "CLIPVisionModel" else HFBackbone
    return backbone_cls(
        model,
        path,
        forward_kwargs=spec.forward_kwargs,
        feature_dim=config.hidden_size,
        token_dim=config.hidden_size,
        data_config=merge_data_config(defaults, processor_config, data_config, weights_config),
    )
