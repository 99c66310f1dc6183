"""Backbones of the three families on tiny random models: norm discovery, shapes, weights and preprocessing."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from lnshift.backbones import Backbone, ModelSpec, find_norms, load_backbone, norm_table, register, registry
from lnshift.backbones.fastpath import apply_fast_paths
from lnshift.config import FAST_PATHS
from lnshift.errors import ModelError
from tiny import same_outputs

DATA_KEYS = {"input_size", "mean", "std", "interpolation", "crop_pct"}
HF_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
TINY_TEXT = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
TINY_CLIPS = {
    "lnshift-tiny-clip": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": TINY_TEXT,
    },
    "lnshift-tiny-timm-clip": {  # open_clip's TimmModel tower: a timm trunk plus a projection head
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_pool": "", "timm_proj": "linear", "image_size": 32},
        "text_cfg": TINY_TEXT,
    },
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _img(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _check_common(backbone: Backbone, size: int, n_tokens: int) -> None:
    assert set(backbone.data_config) >= DATA_KEYS
    assert len(backbone.data_config["input_size"]) == 3
    x = _img(size)
    with torch.no_grad():
        feats, tokens = backbone(x), backbone.forward_tokens(x)
    assert feats.shape == (2, backbone.feature_dim)
    assert tokens.shape == (2, n_tokens, backbone.token_dim)
    # every family's patch embedding is found by the fast path patch_matmul (and only changes rounding)
    fast = copy.deepcopy(backbone)
    assert "patch_matmul" in apply_fast_paths(fast, FAST_PATHS)
    with torch.no_grad():
        same_outputs(fast(x), feats)


# ---------------------------------------------------------------- norm discovery


@pytest.mark.parametrize("name", ["test_vit", "test_vit2", "test_vit3"])
def test_timm_norms_by_type(name: str) -> None:
    backbone = load_backbone(name, pretrained=False)
    model = backbone.model
    finals = ("norm", "fc_norm", "norm_pre")
    expected = 2 * len(model.blocks) + sum(isinstance(getattr(model, a), nn.LayerNorm) for a in finals)
    expected += model.attn_pool is not None  # MAP pooling carries its own LayerNorm
    norms = backbone.norm_modules()
    assert len(norms) == expected
    assert list(norms)[:2] == ["model.blocks.0.norm1", "model.blocks.0.norm2"]
    assert not any(isinstance(m, nn.Identity) for m in norms.values())


def test_rms_norms_only_when_asked() -> None:
    module = nn.Sequential(
        nn.Linear(8, 8), nn.RMSNorm(8), nn.LayerNorm(8), nn.LayerNorm(8, elementwise_affine=False), nn.Identity()
    )
    assert list(find_norms(module)) == ["2"]
    assert list(find_norms(module, include_rms=True)) == ["1", "2"]
    timm_rms = load_backbone("test_vit4", pretrained=False)  # timm RmsNorm is not a torch RMSNorm
    assert timm_rms.norm_modules() == {}
    assert len(timm_rms.norm_modules(include_rms=True)) == 2 * len(timm_rms.model.blocks) + 1


def test_layerscale_and_norm_table() -> None:
    backbone = load_backbone("test_vit2", pretrained=False)
    scales = backbone.layerscale_parameters()
    assert len(scales) == 2 * len(backbone.model.blocks)
    assert "model.blocks.0.ls1.gamma" in scales
    assert load_backbone("lnshift/test-vit").layerscale_parameters() == {}

    rows, summary = norm_table(backbone)
    assert rows[0] == {"name": "model.blocks.0.norm1", "type": "LayerNorm", "shape": (64,), "params": 128}
    assert summary["norm_params"] == 128 * len(rows)
    assert summary["backbone_params"] == sum(p.numel() for p in backbone.parameters())
    assert summary["share"] == pytest.approx(summary["norm_params"] / summary["backbone_params"])


# ---------------------------------------------------------------- timm


def test_registry_name_and_timm_features() -> None:
    backbone = load_backbone("lnshift/test-vit")
    assert (backbone.name, backbone.family, backbone.feature_dim) == ("lnshift/test-vit", "timm", 64)
    assert not backbone.training
    _check_common(backbone, 32, 1 + 4)  # dynamic_img_size: small inputs keep tests fast
    x = _img(32)
    with torch.no_grad():
        same_outputs(backbone(x), backbone.forward_tokens(x)[:, 0])  # CLS pooling, after `norm`


def test_registry_structure() -> None:
    assert "lnshift/test-vit" in registry.list_models()
    with pytest.raises(ModelError, match="already registered"):
        register(registry.get("lnshift/test-vit"))
    with pytest.raises(ModelError, match="lnshift/test-vit"):
        registry.get("lnshift/test-vt")
    with pytest.raises(ModelError, match="source"):
        ModelSpec(name="x", source="keras", arch="x")


def test_unknown_name_suggests() -> None:
    with pytest.raises(ModelError, match=r"did you mean.*test_vit"):
        load_backbone("test_vt")


def test_offline_pretrained_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, pretrained: bool = False, **kwargs: object) -> nn.Module:
        raise OSError("no connection")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(ModelError, match=r"offline.*--weights FILE"):
        load_backbone("test_vit")


@pytest.fixture(scope="module")
def vit_source() -> nn.Module:
    """A test_vit with a classifier head, whose weights the loading tests save in various forms."""
    return timm.create_model("test_vit", pretrained=False, num_classes=5).eval()


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_safetensors_round_trip_with_data_config(vit_source: nn.Module, tmp_path: Path) -> None:
    config = {"input_size": [3, 128, 128], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    file = tmp_path / "tuned.safetensors"
    save_file(vit_source.state_dict(), str(file), metadata={"lnshift.data_config": json.dumps(config)})

    backbone = load_backbone("test_vit", weights=str(file), pretrained=False)  # head.* keys are dropped
    x = _img(32)
    with torch.no_grad():
        same_outputs(backbone(x), _pooled(vit_source, x))
    assert backbone.data_config["input_size"] == (3, 128, 128)
    assert backbone.data_config["mean"] == (0.1, 0.2, 0.3)
    assert backbone.data_config["interpolation"] == "bicubic"  # the rest still comes from timm


def test_wrapped_pth_and_timm_folder(vit_source: nn.Module, tmp_path: Path) -> None:
    state = vit_source.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    x = _img(32)
    expected = _pooled(vit_source, x)
    with torch.no_grad():
        same_outputs(load_backbone("test_vit", weights=str(tmp_path / "ckpt.pth"))(x), expected)

    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    cfg = {"architecture": "test_vit", "pretrained_cfg": {"crop_pct": 1.0, "interpolation": "bilinear"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    for backbone in (load_backbone(str(folder)), load_backbone("test_vit", weights=str(folder))):
        assert backbone.data_config["crop_pct"] == 1.0
        assert backbone.data_config["interpolation"] == "bilinear"
        with torch.no_grad():
            same_outputs(backbone(x), expected)


def test_mismatching_weights_name_keys(vit_source: nn.Module, tmp_path: Path) -> None:
    shallow = {k: v for k, v in vit_source.state_dict().items() if not k.startswith(("blocks.4.", "blocks.5."))}
    save_file(shallow, str(tmp_path / "shallow.safetensors"))
    with pytest.raises(ModelError, match=r"shallow\.safetensors.*missing keys \[blocks\.4\.norm1\.weight"):
        load_backbone("test_vit", weights=str(tmp_path / "shallow.safetensors"))

    state = dict(vit_source.state_dict())
    state["blocks.0.norm1.weight"] = torch.ones(65)
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelError) as err:
        load_backbone("test_vit", weights=str(tmp_path / "bad.pt"))
    assert "unexpected keys [extra.weight]" in str(err.value)
    assert "blocks.0.norm1.weight (65,) in file vs (64,) in model" in str(err.value)


def test_other_architecture_s_weights_for_the_bundled_model(vit_source: nn.Module, tmp_path: Path) -> None:
    """Its position embeddings cannot be resampled to the bundled model's: the error lists what does not fit."""
    save_file(vit_source.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError) as err:
        load_backbone("lnshift/vit-tiny-cifar10", weights=str(tmp_path / "other.safetensors"))
    assert "other.safetensors do not fit timm model" in str(err.value)
    assert "unexpected keys [cls_token" in str(err.value)
    assert "blocks.0.norm1.weight (64,) in file vs (192,) in model" in str(err.value)


def test_pos_embed_resampled_for_other_img_size(vit_source: nn.Module, tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file(vit_source.state_dict(), str(file))
    backbone = load_backbone("test_vit", weights=str(file), model_kwargs={"img_size": 48})
    assert backbone.data_config["input_size"] == (3, 48, 48)
    assert backbone.model.pos_embed.shape == (1, 1 + 9, 64)
    _check_common(backbone, 48, 1 + 9)


# ---------------------------------------------------------------- HF transformers


def _hf_folder(tmp_path: Path, model: nn.Module, processor: dict | None) -> str:
    model.save_pretrained(tmp_path)
    if processor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(tmp_path)


def test_hf_vit_folder(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    native = ViTModel(ViTConfig(patch_size=8, **HF_KW), add_pooling_layer=False).eval()
    processor = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2, "size": {"height": 32, "width": 32}}
    folder = _hf_folder(tmp_path / "vit", native, processor)
    backbone = load_backbone(f"hf:{folder}")
    assert backbone.family == "hf"
    norms = list(backbone.norm_modules())
    assert len(norms) == 2 * 2 + 1 and norms[-1] == "model.layernorm"
    assert backbone.data_config == {
        "input_size": (3, 32, 32),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    _check_common(backbone, 32, 1 + 16)
    x = _img(32)
    with torch.no_grad():
        assert torch.allclose(backbone(x), native(pixel_values=x).last_hidden_state[:, 0])
    # the same architecture with weights from a state-dict file
    torch.save(native.state_dict(), tmp_path / "vit.pth")
    reloaded = load_backbone(folder, weights=str(tmp_path / "vit.pth"), pretrained=False)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), backbone(x))


def test_hf_dinov2_folder(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    processor = {
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
    }
    folder = _hf_folder(tmp_path, Dinov2Model(Dinov2Config(patch_size=8, **HF_KW)), processor)
    backbone = load_backbone(folder)  # a plain folder works without the hf: prefix
    assert len(backbone.norm_modules()) == 2 * 2 + 1
    assert "model.encoder.layer.0.layer_scale1.lambda1" in backbone.layerscale_parameters()
    assert backbone.data_config["crop_pct"] == pytest.approx(0.8)
    assert backbone.data_config["interpolation"] == "bicubic"
    _check_common(backbone, 32, 1 + 16)


def test_hf_clip_vision_from_full_clip(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    clip = CLIPModel(CLIPConfig(vision_config=dict(patch_size=8, **HF_KW), text_config=text, projection_dim=16))
    backbone = load_backbone(f"hf:{_hf_folder(tmp_path, clip, None)}")
    names = [n.rsplit(".", 1)[-1] for n in backbone.norm_modules()]
    assert names[0] == "pre_layrnorm" and names[-1] == "post_layernorm"
    assert len(names) == 2 * 2 + 2
    assert backbone.data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    _check_common(backbone, 32, 1 + 16)
    x = _img(32)
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=x).pooler_output
        assert torch.allclose(backbone(x), pooled, atol=1e-5)
        assert torch.allclose(backbone.forward_tokens(x)[:, 0], pooled, atol=1e-5)


def test_hf_missing_dependency(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"lnshift\[hf\]"):
        load_backbone(f"hf:{tmp_path}")


@pytest.mark.parametrize("fallback", [False, True])
def test_hf_missing_folder_is_a_model_error_naming_it(tmp_path: Path, fallback: bool) -> None:
    """Also when a model_type would let the architecture be built without the folder (registry-style kwargs)."""
    missing = tmp_path / "missing"
    kwargs = {"model_type": "vit"} if fallback else {}
    with pytest.raises(ModelError, match=f"HF model folder not found: '{missing}'"):
        load_backbone(f"hf:{missing}", pretrained=not fallback, model_kwargs=kwargs)


# ---------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    for name, config in TINY_CLIPS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return open_clip.create_model("lnshift-tiny-clip").eval()


def test_open_clip_visual_from_state_dicts(tiny_clip: nn.Module, tmp_path: Path) -> None:
    torch.save(tiny_clip.state_dict(), tmp_path / "clip.pt")
    save_file(tiny_clip.visual.state_dict(), str(tmp_path / "visual.safetensors"))
    x = _img(32)
    for file in ("clip.pt", "visual.safetensors"):
        backbone = load_backbone("open_clip:lnshift-tiny-clip", weights=str(tmp_path / file))
        assert (backbone.family, backbone.feature_dim, backbone.token_dim) == ("open_clip", 16, 32)
        names = list(backbone.norm_modules())
        assert names[0] == "model.ln_pre" and names[-1] == "model.ln_post"
        assert "model.transformer.resblocks.1.ln_2" in names and len(names) == 2 * 2 + 2
        assert backbone.data_config["interpolation"] == "bicubic"
        _check_common(backbone, 32, 1 + 16)
        with torch.no_grad():
            assert torch.allclose(backbone(x), tiny_clip.encode_image(x), atol=1e-5)
            cls = backbone.forward_tokens(x)[:, 0]
            assert torch.allclose(cls @ backbone.model.proj, backbone(x), atol=1e-5)


def test_open_clip_timm_tower(tiny_clip: nn.Module) -> None:
    backbone = load_backbone("open_clip:lnshift-tiny-timm-clip", pretrained=False)
    assert len(backbone.norm_modules()) == 2 * 6 + 1
    assert (backbone.feature_dim, backbone.token_dim) == (16, 64)
    _check_common(backbone, 32, 1 + 4)


def test_open_clip_errors(tiny_clip: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="weights file"):
        load_backbone("open_clip:lnshift-tiny-clip")
    with pytest.raises(ModelError, match="ViT-B-16"):
        load_backbone("open_clip:ViT-B-61", pretrained=False)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ModelError, match=r"lnshift\[clip\]"):
        load_backbone("open_clip:lnshift-tiny-clip", pretrained=False)
