"""The Backbone interface shared by all model families, norm discovery by type, and weights-file loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..errors import ModelError

DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
METADATA_KEY = "lnshift.data_config"
# Weight file names looked up (in this order) when `weights` is a folder.
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")
HEAD_PREFIXES = ("head.", "fc.", "head_dist.")


class Backbone(nn.Module):
    """A ViT feature extractor of one family (timm / HF transformers / open_clip).

    The library model is the submodule `model`, so parameter names are `model.<native name>` and a
    strategy can select LayerNorms by name without knowing the family. `fast_paths` lists the fast
    paths turned on at load (backbones/fastpath.py; none: the library's own forward).
    """

    family: str
    # where the family keeps its patch-embedding conv (names in `model`), for the fast path patch_matmul
    patch_convs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, name: str, *, feature_dim: int, token_dim: int, data_config: dict) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.feature_dim = int(feature_dim)
        self.token_dim = int(token_dim)
        self.data_config = data_config
        self.fast_paths: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (B, feature_dim), as the model's own classifier would see them."""
        raise NotImplementedError

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Final normalised token sequence (B, N, token_dim), prefix tokens included."""
        raise NotImplementedError

    def norm_modules(self, include_rms: bool = False) -> dict[str, nn.Module]:
        return find_norms(self, include_rms=include_rms)

    def layerscale_parameters(self) -> dict[str, nn.Parameter]:
        """Per-channel LayerScale factors (timm `gamma`, HF Dinov2 `lambda1`), found by class name."""
        found = {}
        for mod_name, module in self.named_modules():
            if "LayerScale" in type(module).__name__:
                for p_name, param in module.named_parameters(recurse=False):
                    found[f"{mod_name}.{p_name}"] = param
        return found

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, family={self.family!r}, feature_dim={self.feature_dim}, fast_paths={self.fast_paths}"
        )


def is_rms(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.RMSNorm) or "RmsNorm" in name or "RMSNorm" in name


def find_norms(module: nn.Module, include_rms: bool = False) -> dict[str, nn.Module]:
    """Every LayerNorm (and RMSNorm if asked) with an affine weight, by type, in module order.

    Matching by type rather than by name covers every family's naming (`norm1`, `layernorm_before`,
    `ln_1`, `pre_layrnorm`...) and skips Identity placeholders and non-affine norms.
    """
    found = {}
    for name, mod in module.named_modules():
        is_norm = isinstance(mod, nn.LayerNorm) or (include_rms and is_rms(mod))
        if is_norm and isinstance(getattr(mod, "weight", None), Tensor):
            found[name] = mod
    return found


def norm_table(backbone: Backbone, include_rms: bool = False) -> tuple[list[dict], dict]:
    """One row per norm and the share of backbone parameters they hold (for `lnshift inspect`)."""
    rows = []
    for name, mod in backbone.norm_modules(include_rms=include_rms).items():
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        rows.append({"name": name, "type": type(mod).__name__, "shape": tuple(mod.weight.shape), "params": params})
    norm_params = sum(r["params"] for r in rows)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    summary = {
        "norm_params": norm_params,
        "backbone_params": backbone_params,
        "share": norm_params / backbone_params if backbone_params else 0.0,
    }
    return rows, summary


def clean_data_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The known preprocessing keys of `raw`, with JSON lists turned back into tuples."""
    out: dict[str, Any] = {}
    for key in DATA_CONFIG_KEYS:
        if raw.get(key) is None:
            continue
        value = raw[key]
        if key == "input_size":
            value = tuple(int(v) for v in value)
        elif key in ("mean", "std"):
            value = tuple(float(v) for v in value)
        elif key == "crop_pct":
            value = float(value)
        else:
            value = str(value)
        out[key] = value
    return out


def merge_data_config(base: dict[str, Any], *overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`base` updated by each override in turn (later ones win), known keys only."""
    out = clean_data_config(base)
    for override in overrides:
        out.update(clean_data_config(override or {}))
    missing = [k for k in DATA_CONFIG_KEYS if k not in out]
    if missing:
        raise ModelError(f"preprocessing config lacks {missing}: {out}")
    return out


def _json_data_config(path: Path) -> dict[str, Any]:
    """Preprocessing keys of a JSON file: either top level or timm hub style under `pretrained_cfg`."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read preprocessing config {path}: {err}") from err
    if not isinstance(raw, dict):
        return {}
    return clean_data_config(raw.get("pretrained_cfg", raw))


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside common checkpoint wrappers, with DDP/compile prefixes removed."""
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ModelError(
                f"no state dict found in weights file {path}: top-level keys {list(obj)[:10]} "
                f"(expected tensors or one of {WRAPPER_KEYS})"
            )
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"weights file {path} holds no tensors")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def stored_data_config(path: Path) -> dict[str, Any]:
    """The preprocessing that travels with a weights file, without reading its tensors.

    Sources, later winning: `config.json` next to the weights (timm hub format or plain keys),
    `<file>.json` / `<stem>.json`, and the safetensors metadata entry `lnshift.data_config`.
    """
    data_config: dict[str, Any] = {}
    for sidecar in (path.parent / "config.json", path.with_suffix(".json"), Path(f"{path}.json")):
        if sidecar.is_file():
            data_config.update(_json_data_config(sidecar))
    if path.suffix != ".safetensors":
        return data_config
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ModelError(f"cannot read safetensors weights {path}: {err}") from err
    if METADATA_KEY in metadata:
        try:
            data_config.update(clean_data_config(json.loads(metadata[METADATA_KEY])))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ModelError(f"bad '{METADATA_KEY}' metadata in {path}: {err}") from err
    return data_config


def read_weights(weights: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict and the preprocessing that travels with it (`stored_data_config`), from a file or a folder."""
    path = Path(weights).expanduser()
    if path.is_dir():
        file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if file is None:
            raise ModelError(f"weights folder {path} has none of {list(WEIGHT_FILES)}")
        path = file
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")

    data_config = stored_data_config(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                obj = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError) as err:
            raise ModelError(f"cannot read safetensors weights {path}: {err}") from err
    elif path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
            raise ModelError(
                f"cannot load weights file {path} with torch.load(weights_only=True) ({err}); "
                "re-save it as a plain state dict or as .safetensors"
            ) from err
    else:
        raise ModelError(f"weights file {path}: unknown format, expected .safetensors, .bin, .pth, .pt or .ckpt")
    return _unwrap(obj, path), data_config


def _listing(items: list[str], limit: int = 10) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], what: str, source: str) -> None:
    """Load `state_dict` exactly (classifier-head keys the module lacks are dropped first).

    A partial load would silently leave random layers in a "pretrained" backbone, so any missing,
    unexpected or mis-shaped key is an error that names the keys, the model and the file.
    """
    own = module.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} in file vs {tuple(own[k].shape)} in model"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} [{_listing(keys)}]"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise ModelError(f"weights {source} do not fit {what}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
