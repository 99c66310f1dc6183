"""Short lnshift model names -> how to build them (library, architecture, kwargs, preprocessing, weights)."""

from __future__ import annotations

import difflib
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.layers import SwiGLUPacked
from torch import nn

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
    """Registered names (or `candidates`) resembling `name`, best first, for error messages.

    Case is ignored so that `UNI` or `Virchow2`, as the model cards write them, still find their entry.
    """
    by_lower: dict[str, str] = {}
    for candidate in candidates if candidates is not None else list(_REGISTRY):
        by_lower.setdefault(candidate.lower(), candidate)
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n)]


register(
    ModelSpec(
        name="lnshift/test-vit",
        source="timm",
        arch="test_vit",
        license="apache-2.0",
        notes="timm's 6-block, 64-wide test ViT with random weights: for tests and dry runs.",
    )
)

# lnshift's own bundled models (pretrain/): one ViT-Tiny layout, patch 4 at 32 px, mean-pooled
BUNDLED_VIT: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
    "mlp_ratio": 4.0,
    "class_token": False,
    "global_pool": "avg",
}

register(
    ModelSpec(
        name="lnshift/vit-tiny-cifar10",
        source="timm",
        arch="vit_tiny_patch16_224",
        model_kwargs=BUNDLED_VIT,
        weights="vit-tiny-cifar10.safetensors",
        license="apache-2.0 (weights trained by lnshift on CIFAR-10 train)",
        notes="bundled compact foundation model: 2.7M-parameter ViT, patch 4 at 32 px, supervised on CIFAR-10 "
        "(86.7% test accuracy); recipe in pretrain/README.md. PACS and LC25000 are unseen.",
    )
)

register(
    ModelSpec(
        name="lnshift/vit-tiny-in200-sup",
        source="timm",
        arch="vit_tiny_patch16_224",
        model_kwargs=BUNDLED_VIT,
        weights="vit-tiny-in200-sup.safetensors",
        license="ImageNet terms, non-commercial research/education (trained by lnshift)",
        notes="bundled compact model with broader pretraining: the same 2.7M-parameter ViT, supervised on the "
        "100,000 Tiny-ImageNet-200 training images at 32 px (200 classes; 44.6% linear probe on its validation "
        "images); recipe and quality in pretrain/README.md. CIFAR-10-like photos are near its pretraining data; "
        "PACS art/cartoon/sketch, LC25000 and brain MRI lie outside it.",
    )
)


# ---------------------------------------------------------------- foundation models
#
# Preprocessing is spelled out per entry so that a name means the same pipeline whether or not the hub
# files are cached. The input size is left to the model (`img_size` / `image_size` in model_kwargs), so a
# user's size override is what gets reported.

IMAGENET = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
INCEPTION = (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
OPENAI_CLIP = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
# Bioptimus' own H&E statistics, from the H-optimus-0 model card.
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def _preprocess(
    norm: tuple[tuple[float, ...], tuple[float, ...]],
    interpolation: str,
    crop_pct: float,
    crop_mode: str = "center",
) -> dict[str, Any]:
    return {
        "mean": norm[0],
        "std": norm[1],
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }


def _dinov2(name: str, arch: str, what: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        source="timm",
        arch=arch,
        model_kwargs={"img_size": 224},
        # DINOv2's evaluation transform: bicubic resize to 256, centre crop 224.
        data_config=_preprocess(IMAGENET, "bicubic", 0.875),
        hub_id=f"hf-hub:timm/{arch}",
        license="apache-2.0",
        notes=f"DINOv2 {what} (Meta, self-supervised on LVD-142M). Built at 224 px, DINOv2's linear-eval size, "
        "instead of timm's 518: position embeddings are resampled on load (model_kwargs img_size=518 for full "
        "size). Original dinov2_vit*14_pretrain.pth files are converted on load.",
    )


register(_dinov2("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", "ViT-S/14"))
register(_dinov2("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", "ViT-B/14"))
register(_dinov2("dinov2-vitl14", "vit_large_patch14_dinov2.lvd142m", "ViT-L/14"))

register(
    ModelSpec(
        name="clip-vitb16-openai",
        source="timm",
        arch="vit_base_patch16_clip_quickgelu_224.openai",
        # The hub repo's config names the GELU variant; CLIP was trained with QuickGELU.
        model_kwargs={"act_layer": "quick_gelu"},
        data_config=_preprocess(OPENAI_CLIP, "bicubic", 1.0),
        hub_id="hf-hub:timm/vit_base_patch16_clip_224.openai",
        license="mit",
        notes="OpenAI CLIP ViT-B/16 image tower. Features are the 768-d CLS after ln_post, before the 512-d "
        "projection (timm drops it with the classifier); open_clip:ViT-B-16 with a weights file keeps it. "
        "crop_pct 1.0 is CLIP's resize + centre crop (timm's metadata says 0.9, and apache-2.0 for the MIT weights).",
    )
)

register(
    ModelSpec(
        name="openclip-vitb16-laion2b",
        source="timm",
        arch="vit_base_patch16_clip_224.laion2b",
        data_config=_preprocess(OPENAI_CLIP, "bicubic", 1.0),
        hub_id="hf-hub:timm/vit_base_patch16_clip_224.laion2b",
        license="mit",
        notes="OpenCLIP ViT-B/16 image tower trained on LAION-2B (timm's port, believed to be "
        "laion/CLIP-ViT-B-16-laion2B-s34B-b88K; unverified here). Features are the 768-d CLS after ln_post, "
        "before the 512-d projection; open_clip:ViT-B-16 with open_clip_pytorch_model.bin keeps the projection.",
    )
)

register(
    ModelSpec(
        name="mae-vitb16",
        source="timm",
        arch="vit_base_patch16_224.mae",
        # MAE's evaluation transform: bicubic resize to 256, centre crop 224 (timm's metadata says 0.9).
        data_config=_preprocess(IMAGENET, "bicubic", 0.875),
        hub_id="hf-hub:timm/vit_base_patch16_224.mae",
        license="cc-by-nc-4.0",
        notes="MAE ViT-B/16 encoder (Meta, masked autoencoding on ImageNet-1k, not fine-tuned). Pooled = CLS "
        "after the final norm (MAE's linear probe); MAE's fine-tuning used average pooling instead. Non-commercial.",
    )
)

register(
    ModelSpec(
        name="augreg-vitb16-in21k",
        source="timm",
        arch="vit_base_patch16_224.augreg_in21k",
        data_config=_preprocess(INCEPTION, "bicubic", 0.9),
        hub_id="hf-hub:timm/vit_base_patch16_224.augreg_in21k",
        license="apache-2.0",
        notes="ViT-B/16 supervised on ImageNet-21k (Google AugReg, 'How to train your ViT'); the 21k-class head "
        "is dropped. Mean/std 0.5. Original .npz checkpoints are not read: use timm's safetensors.",
    )
)

register(
    ModelSpec(
        name="uni",
        source="timm",
        arch="vit_large_patch16_224",
        model_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        # Model card: Resize(224) (torchvision's default bilinear), CenterCrop(224), ImageNet mean/std.
        data_config=_preprocess(IMAGENET, "bilinear", 1.0),
        hub_id="hf-hub:MahmoodLab/UNI",
        license="cc-by-nc-nd-4.0, gated",
        notes="UNI (Mahmood Lab): ViT-L/16, DINOv2-trained on Mass-100K H&E tiles. Gated on HF: accept the "
        "terms, then --weights pytorch_model.bin from the repo loads offline. Non-commercial academic use; the "
        "terms also restrict models trained on its outputs. Code snippets often write 'MahmoodLab/uni': the local "
        "HF cache is case-sensitive, so pass the file if the cache holds that spelling.",
    )
)

register(
    ModelSpec(
        name="uni2-h",
        source="timm",
        arch="vit_giant_patch14_224",
        model_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        data_config=_preprocess(IMAGENET, "bilinear", 1.0),
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        license="cc-by-nc-nd-4.0, gated",
        notes="UNI2-h (Mahmood Lab): ViT-H/14-style, 24 blocks of width 1536 with SwiGLU, 8 register tokens; "
        "timm kwargs from the model card. Gated, same non-commercial terms as UNI. Preprocessing assumed as "
        "UNI's (resize 224 bilinear, centre crop, ImageNet mean/std): interpolation not checked against the card.",
    )
)

register(
    ModelSpec(
        name="virchow2",
        source="timm",
        arch="vit_huge_patch14_224",
        model_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
            "global_pool": "token",
            "dynamic_img_size": True,
        },
        data_config=_preprocess(IMAGENET, "bicubic", 1.0),
        hub_id="hf-hub:paige-ai/Virchow2",
        license="cc-by-nc-nd-4.0, gated",
        notes="Virchow2 (Paige / Microsoft): ViT-H/14, SwiGLU, 4 register tokens. Gated, non-commercial. "
        "Pooled = CLS (1280-d); the card's tile embedding is CLS concatenated with the mean patch token (2560-d), "
        "which lnshift does not build (global_pool 'token' replaces the repo config's '').",
    )
)

register(
    ModelSpec(
        name="h-optimus-0",
        source="timm",
        arch="vit_giant_patch14_reg4_dinov2",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        data_config=_preprocess(H_OPTIMUS, "bicubic", 1.0),
        hub_id="hf-hub:bioptimus/H-optimus-0",
        license="apache-2.0, gated",
        notes="H-optimus-0 (Bioptimus): ViT-g/14, 40 blocks of width 1536, SwiGLU, 4 register tokens. "
        "Apache-2.0, gated behind a terms form. Its own H&E mean/std; the card feeds 224-px tiles at 0.5 um/px "
        "without resizing, so interpolation (bicubic here) is unspecified. The card passes dynamic_img_size=False; "
        "True gives the same outputs at 224 px and also accepts other sizes.",
    )
)

register(
    ModelSpec(
        name="phikon",
        source="hf",
        arch="owkin/phikon",
        model_kwargs={
            "model_type": "vit",
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
        },
        data_config=_preprocess(IMAGENET, "bilinear", 1.0, "squash"),
        hub_id="owkin/phikon",
        license="other (Owkin)",
        notes="Phikon (Owkin): HF ViTModel ViT-B/16, iBOT-trained on 40M TCGA tiles; pooled = CLS of "
        "last_hidden_state. Not gated; licence 'other' on the HF card (Owkin's terms: check before commercial use). "
        "Offline, the config is built from the entry (HF's layer_norm_eps 1e-12: the repo's value is not checked); "
        "resize mode and interpolation assumed from HF's ViT processor.",
    )
)

register(
    ModelSpec(
        name="phikon-v2",
        source="hf",
        arch="owkin/phikon-v2",
        model_kwargs={
            "model_type": "dinov2",
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 16,
        },
        data_config=_preprocess(IMAGENET, "bicubic", 1.0),
        hub_id="owkin/phikon-v2",
        license="other (Owkin)",
        notes="Phikon-v2 (Owkin): HF Dinov2Model ViT-L/16, DINOv2-trained on 460M public-cohort tiles; pooled "
        "= CLS. Not gated; licence 'other' on the HF card (check before commercial use). Trained on 224-px tiles "
        "(crop_pct 1.0); image_size 224 (position-embedding shape) and bicubic are not checked against the repo.",
    )
)


# timm ViTs skip their weight init, which is slow on the meta device and pointless for counting.
_META_KWARGS: dict[str, dict[str, Any]] = {"timm": {"weight_init": "skip"}}


def _param_count(spec: ModelSpec) -> int | None:
    """Parameters of a registered model, built on the meta device (no memory, no weights, no download)."""
    from . import load_backbone  # the loaders import this module

    try:
        with torch.device("meta"):
            backbone = load_backbone(spec.name, pretrained=False, model_kwargs=_META_KWARGS.get(spec.source))
    except ModelError:
        return None
    return sum(p.numel() for p in backbone.parameters())


def models_table() -> list[dict[str, Any]]:
    """One row per registered model, for `lnshift models`; parameter counts come from meta-device builds."""
    return [
        {
            "name": spec.name,
            "source": spec.source,
            "arch": spec.arch,
            "hub_id": spec.hub_id,
            "params": _param_count(spec),
            "license": spec.license,
            "notes": spec.notes,
        }
        for spec in (_REGISTRY[name] for name in list_models())
    ]


def _millions(params: int | None) -> str:
    if params is None:
        return "?"
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def format_models_table(rows: list[dict[str, Any]], width: int = 120) -> str:
    """Name, size and licence aligned per model; source, architecture, weights and notes wrapped beneath."""
    header = ("name", "params", "license")
    cells = [(r["name"], _millions(r["params"]), r["license"]) for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]
    lines = []
    for row, cell in zip([None, *rows], [header, *cells], strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip())
        if row is not None:
            weights = f", weights {row['hub_id']}" if row["hub_id"] else ""
            text = f"{row['source']} {row['arch']}{weights}. {row['notes']}"
            lines.extend(textwrap.wrap(text, width=width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)
