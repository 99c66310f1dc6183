"""The fast-path switch: plain timm by default and on the CPU, hooks and pooling changes honoured, recorded."""

from __future__ import annotations

import pytest
import timm
import torch

from lnshift.backbones import Backbone, load_backbone, resolve_fast_paths
from lnshift.backbones.gelu_table import TableGELU
from lnshift.backbones.patch_matmul import PatchConv2d
from lnshift.config import FAST_PATHS, FitConfig
from lnshift.errors import ConfigError
from lnshift.training.ingredients import load_configured_backbone

TINY = {"img_size": 32, "patch_size": 8}
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
SETTINGS = ["off", "all", *FAST_PATHS]


def vit(setting: str, **kwargs: object) -> Backbone:
    """test_vit (class-token pooling) with the fast paths a setting names."""
    torch.manual_seed(0)
    names = resolve_fast_paths(setting, CPU, training=True)
    return load_backbone("test_vit", pretrained=False, model_kwargs={**TINY, **kwargs}, fast_paths=names)


def plain(backbone: Backbone) -> bool:
    """No module swapped and no shortcut: the library's own forward."""
    swapped = any(isinstance(m, (PatchConv2d, TableGELU)) for m in backbone.modules())
    return not swapped and not getattr(backbone, "class_token_only", False) and backbone.fast_paths == []


def timm_features(backbone: Backbone, x: torch.Tensor, pool: str = "token") -> torch.Tensor:
    """Pooled features of timm's own model with the same weights, its pooling set to `pool` after loading."""
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0, **TINY).eval()
    reference.load_state_dict(backbone.model.state_dict())
    reference.reset_classifier(0, global_pool=pool)
    with torch.no_grad():
        return reference(x)


def test_auto_is_on_only_to_train_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_fast_paths("auto", CPU, training=True) == ()
    assert resolve_fast_paths("auto", CUDA, training=False) == ()
    monkeypatch.setattr("lnshift.backbones.fastpath.triton_kernels", lambda: object())
    assert resolve_fast_paths("auto", CUDA, training=True) == FAST_PATHS
    monkeypatch.setattr("lnshift.backbones.fastpath.triton_kernels", lambda: None)  # the lookup would be slower
    assert resolve_fast_paths("auto", CUDA, training=True) == ("patch_matmul", "class_token")
    assert resolve_fast_paths("off", CUDA, training=True) == ()
    assert resolve_fast_paths("all", CPU, training=False) == FAST_PATHS
    assert resolve_fast_paths("class_token, patch_matmul", CPU, training=False) == ("patch_matmul", "class_token")


def test_settings_are_checked_and_yaml_booleans_read() -> None:
    with pytest.raises(ConfigError, match="fast-paths: unknown \\['gelu'\\]"):
        FitConfig.from_dict({"fast_paths": "patch_matmul,gelu"})
    assert FitConfig.from_dict({"fast_paths": False}).runtime.fast_paths == "off"  # YAML's `off`
    with pytest.raises(ConfigError, match="unknown fast paths"):
        load_backbone("test_vit", pretrained=False, model_kwargs=TINY, fast_paths=["fused"])


@pytest.mark.parametrize("name", ["test_vit", "lnshift/vit-tiny-cifar10"])
def test_cpu_and_library_default_are_plain(name: str) -> None:
    assert plain(load_backbone(name, pretrained=False))
    cfg = FitConfig.from_dict({"model": name, "pretrained": False})
    assert plain(load_configured_backbone(cfg, CPU, training=True))
    assert plain(load_configured_backbone(cfg, CUDA, training=False))  # evaluation, merge on a GPU: plain too


def test_all_applies_only_what_the_architecture_has() -> None:
    assert vit("all").fast_paths == list(FAST_PATHS)
    assert vit("all", global_pool="avg").fast_paths == ["patch_matmul", "table_gelu"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_hooks_on_blocks_and_attention_fire(setting: str) -> None:
    """Feature extraction by hooks (and wrappers that hook blocks) sees every block and every token."""
    backbone = vit(setting).eval()
    x = torch.randn(2, 3, 32, 32)
    seen: dict[str, torch.Size] = {}
    last = backbone.model.blocks[-1]
    last.register_forward_hook(lambda m, args, out: seen.__setitem__("block", out.shape))
    backbone.model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("attn", args[0].shape))
    with torch.no_grad():
        features = backbone(x)
    tokens = (2, 1 + (32 // 8) ** 2, backbone.token_dim)
    assert seen == {"block": tokens, "attn": tokens}
    torch.testing.assert_close(features, timm_features(backbone, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("pool", ["avg", "max", ""])
def test_pooling_changed_after_load_gives_timm_s_features(setting: str, pool: str) -> None:
    backbone = vit(setting).eval()
    backbone.model.reset_classifier(0, global_pool=pool)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone(x)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, timm_features(backbone, x, pool), rtol=1e-5, atol=1e-5)


def test_shortcut_returns_when_the_hook_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = vit("class_token")
    calls = []
    monkeypatch.setattr(
        "lnshift.backbones.timm_backbone.class_token_features",
        lambda m, x: calls.append(1) or m.forward_features(x)[:, :1],
    )
    handle = backbone.model.blocks[1].attn.qkv.register_forward_hook(lambda *a: None)
    backbone(torch.randn(1, 3, 32, 32))
    assert not calls
    handle.remove()
    backbone(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_backward_hooks_on_blocks_fire() -> None:
    """They need the Block's own forward too."""
    backbone = vit("all").train()
    grads = []
    backbone.model.blocks[0].register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].shape))
    backbone(torch.randn(2, 3, 32, 32, requires_grad=True)).sum().backward()
    assert grads == [(2, 1 + (32 // 8) ** 2, backbone.token_dim)]
