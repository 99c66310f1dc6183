"""Named foundation models: every entry builds (on the meta device, so ViT-g costs nothing), finds its
LayerNorms, gives the right shapes and preprocessing, matches published sizes, loads weights files offline."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from lnshift.backbones import Backbone, load_backbone, registry
from lnshift.backbones.hf_backbone import load_hf
from lnshift.backbones.registry import format_models_table, models_table
from lnshift.errors import ModelError
from tiny import same_outputs

NAMES = registry.list_models()
DATA_KEYS = {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
# timm's weight init is slow on the meta device and meaningless there.
META_KWARGS = {"timm": {"weight_init": "skip"}}
BLOCK = re.compile(r"\.(?:blocks|layers?)\.(\d+)\.")  # timm blocks.N; HF encoder.layer.N or layers.N
FINAL_NORMS = {"model.norm", "model.fc_norm", "model.norm_pre", "model.layernorm"}

# Facts published on model cards / papers (and third-party loaders of the checkpoints): parameters in
# millions, tokens at 224 px (CLS + registers + patches) and pooled feature width.
PUBLISHED = {
    "dinov2-vits14": (21, 1 + 256, 384),
    "dinov2-vitb14": (86, 1 + 256, 768),
    "dinov2-vitl14": (300, 1 + 256, 1024),
    "uni": (None, 1 + 196, 1024),
    "uni2-h": (681, 1 + 8 + 256, 1536),
    "virchow2": (632, 1 + 4 + 256, 1280),
    "h-optimus-0": (1100, 1 + 4 + 256, 1536),
    "phikon": (86, 1 + 196, 768),
    "phikon-v2": (307, 1 + 196, 1024),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _meta(name: str, **model_kwargs: object) -> Backbone:
    kwargs = {**META_KWARGS.get(registry.get(name).source, {}), **model_kwargs}
    with torch.device("meta"):
        return load_backbone(name, pretrained=False, model_kwargs=kwargs)


def _depth(backbone: Backbone) -> int:
    model = backbone.model
    return len(model.blocks) if backbone.family == "timm" else model.config.num_hidden_layers


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_with_norms_shapes_and_preprocessing(name: str) -> None:
    spec = registry.get(name)
    backbone = _meta(name)
    assert backbone.family == spec.source
    assert all(p.is_meta for p in backbone.parameters())

    norms = backbone.norm_modules()
    assert all(isinstance(m, nn.LayerNorm) for m in norms.values())
    per_block = Counter(int(m.group(1)) for n in norms if (m := BLOCK.search(n)))
    assert per_block == {i: 2 for i in range(_depth(backbone))}  # norm1/norm2 (layernorm_before/after)
    finals = {n for n in norms if not BLOCK.search(n)}
    assert finals <= FINAL_NORMS and finals & {"model.norm", "model.fc_norm", "model.layernorm"}
    assert ("model.norm_pre" in finals) == ("clip" in name)  # CLIP's ln_pre

    config = backbone.data_config
    assert set(config) >= DATA_KEYS
    assert {k: config[k] for k in spec.data_config} == spec.data_config
    _, height, width = config["input_size"]
    x = torch.empty(2, 3, height, width, device="meta")
    assert backbone(x).shape == (2, backbone.feature_dim)
    tokens = backbone.forward_tokens(x)
    assert tokens.shape[0::2] == (2, backbone.token_dim)
    if name in PUBLISHED:
        _, n_tokens, feature_dim = PUBLISHED[name]
        assert (height, width) == (224, 224)
        assert (tokens.shape[1], backbone.feature_dim) == (n_tokens, feature_dim)


def test_published_sizes_and_checkpoint_layouts() -> None:
    params = {row["name"]: row["params"] for row in models_table()}
    for name, (millions, _, _) in PUBLISHED.items():
        if millions is not None:
            assert params[name] / 1e6 == pytest.approx(millions, rel=0.04), name

    # Shapes a checkpoint must match for --weights to load strictly: LayerScale from init_values, register
    # tokens, position embeddings with (Virchow2) or without (no_embed_class) the prefix tokens, SwiGLU widths.
    expected = {
        "uni": {"pos_embed": (1, 197, 1024), "blocks.0.ls1.gamma": (1024,), "blocks.23.mlp.fc1.weight": (4096, 1024)},
        "uni2-h": {"pos_embed": (1, 256, 1536), "reg_token": (1, 8, 1536), "blocks.0.mlp.fc2.weight": (1536, 4096)},
        "virchow2": {"pos_embed": (1, 261, 1280), "reg_token": (1, 4, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280)},
        "h-optimus-0": {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "blocks.39.ls2.gamma": (1536,)},
    }
    for name, shapes in expected.items():
        state = _meta(name).model.state_dict()
        assert {k: tuple(state[k].shape) for k in shapes} == shapes, name
    activations = {type(m).__name__ for m in _meta("clip-vitb16-openai").modules()}
    assert "QuickGELU" in activations  # OpenAI CLIP's activation, not timm's GELU default


def _save_random(name: str, path: Path, **model_kwargs: object) -> Backbone:
    source = load_backbone(name, pretrained=False, model_kwargs=model_kwargs)
    torch.save(source.model.state_dict(), path)
    return source


def test_dinov2_weights_file_round_trip(tmp_path: Path) -> None:
    # The full 12-block ViT-S/14, at 56 px so the CPU forward is cheap.
    file = tmp_path / "pytorch_model.bin"
    source = _save_random("dinov2-vits14", file, img_size=56)
    loaded = load_backbone("dinov2-vits14", weights=str(file), model_kwargs={"img_size": 56})
    assert loaded.data_config["input_size"] == (3, 56, 56)  # the user's size wins over the entry's
    assert loaded.data_config["crop_pct"] == 0.875
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        same_outputs(loaded(x), source(x))


def test_uni_weights_file_offline(tmp_path: Path) -> None:
    # `--model uni --weights pytorch_model.bin`: the entry's ViT-L/16 (LayerScale, dynamic size), one block deep.
    file = tmp_path / "pytorch_model.bin"
    source = _save_random("uni", file, depth=1)
    loaded = load_backbone("uni", weights=str(file), model_kwargs={"depth": 1})
    assert loaded.data_config["mean"] == (0.485, 0.456, 0.406)
    x = torch.randn(1, 3, 64, 64)  # dynamic_img_size: any multiple of 16
    with torch.no_grad():
        same_outputs(loaded(x), source(x))

    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*missing keys \[blocks\.1\."):
        load_backbone("uni", weights=str(file), model_kwargs={"depth": 2})


def test_hf_entry_weights_file_without_hub_files(tmp_path: Path) -> None:
    # Phikon is built from the entry's config when owkin/phikon is not in the local HF cache.
    file = tmp_path / "pytorch_model.bin"
    source = _save_random("phikon", file, num_hidden_layers=1)
    loaded = load_backbone("phikon", weights=str(file), model_kwargs={"num_hidden_layers": 1})
    assert loaded.data_config["crop_mode"] == "squash"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        same_outputs(loaded(x), source(x))

    with pytest.raises(ModelError, match=r"'lnshift-tests/not-cached'.*--weights FILE"):
        load_hf("lnshift-tests/not-cached", model_kwargs={"model_type": "vit"})


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [("UNI2", "uni2-h"), ("Virchow2", "virchow2"), ("dinov2-vits16", "dinov2-vits14"), ("h-optimus", "h-optimus-0")],
)
def test_unknown_name_suggests_entries(typed: str, suggested: str) -> None:
    with pytest.raises(ModelError, match=rf"unknown model '{typed}'.*did you mean.*\b{suggested}\b"):
        load_backbone(typed)
    with pytest.raises(ModelError, match=rf"did you mean.*\b{suggested}\b"):
        registry.get(typed)


def test_models_table_lists_every_entry() -> None:
    rows = models_table()
    assert [r["name"] for r in rows] == NAMES
    assert all(set(r) == {"name", "source", "arch", "hub_id", "params", "license", "notes"} for r in rows)
    assert all(isinstance(r["params"], int) and r["params"] > 0 for r in rows)
    gated = {r["name"] for r in rows if "gated" in r["license"]}
    assert gated == {"uni", "uni2-h", "virchow2", "h-optimus-0"}

    text = format_models_table(rows)
    assert all(len(line) <= 120 for line in text.splitlines())
    for row in rows:
        assert re.search(rf"^{re.escape(row['name'])} ", text, re.MULTILINE)
        assert row["hub_id"] is None or row["hub_id"] in text
    assert "681.4M" in text and "1.13B" in text
