"""The fast path `class_token`: with class-token pooling the last block's tail runs on the class token only
(same features, same gradients), and timm's forward runs wherever a hook or a pooling change needs it."""

from __future__ import annotations

import copy

import pytest
import torch

from lnshift.backbones import Backbone, load_backbone
from lnshift.backbones.timm_backbone import attention, class_token_features
from lnshift.strategies import StrategyOptions, get_strategy
from lnshift.training.heads import Classifier, build_head
from lnshift.training.loop import set_trainable

TINY = {"img_size": 32, "patch_size": 8}


def shortcut_vit(model_kwargs: dict) -> Backbone:
    """test_vit with the class-token fast path on."""
    return load_backbone("test_vit", None, pretrained=False, model_kwargs=model_kwargs, fast_paths=["class_token"])


def ln_tuned_pair(model_kwargs: dict) -> tuple[Classifier, Classifier, list[str]]:
    """Two copies of a LN-tuning classifier in train mode (dropout-free); the second takes timm's own path."""
    torch.manual_seed(0)
    backbone = shortcut_vit(model_kwargs)
    model = Classifier(backbone, build_head("linear", backbone.feature_dim, backbone.token_dim, 4))
    names = get_strategy("ln").select(model, StrategyOptions())
    set_trainable(model, names)
    full = copy.deepcopy(model)
    full.backbone.class_token_only = False
    return model.train(), full.train(), names


@pytest.mark.parametrize(
    "model_kwargs", [TINY, {**TINY, "reg_tokens": 2, "init_values": 0.1}, {**TINY, "qk_norm": True}]
)
def test_same_logits_and_layernorm_gradients(model_kwargs: dict) -> None:
    model, full, names = ln_tuned_pair(model_kwargs)
    assert model.backbone.class_token_only
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model, full = model.double(), full.double()
    logits, expected = model(x), full(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    target = torch.tensor([0, 1, 3])
    params, full_params = dict(model.named_parameters()), dict(full.named_parameters())
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target), [params[n] for n in names])
    full_grads = torch.autograd.grad(
        torch.nn.functional.cross_entropy(expected, target), [full_params[n] for n in names]
    )
    last_norm2 = names.index("backbone.model.blocks.1.norm2.weight")
    assert grads[last_norm2].abs().sum() > 0  # the shortened tail still trains
    for name, a, b in zip(names, grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_features_are_the_class_token_of_forward_features() -> None:
    model, _, _ = ln_tuned_pair(TINY)
    timm_model = model.backbone.model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = class_token_features(timm_model, x)
    assert out.shape == (2, 1, timm_model.num_features)
    torch.testing.assert_close(out, timm_model.forward_features(x)[:, :1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_kwargs", [{**TINY, "global_pool": "avg"}, {**TINY, "global_pool": "map"}])
def test_other_poolings_keep_every_token(model_kwargs: dict) -> None:
    backbone = shortcut_vit(model_kwargs)
    assert not backbone.class_token_only and backbone.fast_paths == []


def test_gradient_checkpointing_takes_timm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = ln_tuned_pair(TINY)
    model.backbone.model.set_grad_checkpointing(True)
    calls = []
    monkeypatch.setattr("lnshift.backbones.timm_backbone.class_token_features", lambda *a: calls.append(a) or None)
    model(torch.randn(2, 3, 32, 32))
    assert not calls


@pytest.mark.parametrize("class_only", [False, True])
def test_attention_apart_equals_timm_attention_with_gradients(class_only: bool) -> None:
    """q, k, v from three products (and queries of the class token only) give timm's values and gradients."""
    torch.manual_seed(0)
    attn = load_backbone("test_vit", None, pretrained=False, model_kwargs=TINY).model.blocks[0].attn.double()
    attn.qkv.bias.data.normal_()  # timm starts biases at zero, which would hide a bias mix-up
    x = torch.randn(2, 17, attn.qkv.in_features, dtype=torch.float64, requires_grad=True)
    ours = attention(attn, x, class_only)
    theirs = attn(x)[:, :1] if class_only else attn(x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(ours)
    wrt = [x, attn.qkv.weight, attn.qkv.bias]
    for a, b in zip(torch.autograd.grad(ours, wrt, grad_out), torch.autograd.grad(theirs, wrt, grad_out), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_lora_wrapped_attention_runs_its_own_forward() -> None:
    """A peft-wrapped qkv must not be bypassed: the shortcut then equals timm's path with the adapter applied."""
    model, _, _ = ln_tuned_pair(TINY)
    get_strategy("lora").prepare(model, StrategyOptions())
    timm_model = model.backbone.model.double().eval()
    for name, p in timm_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # peft starts B at zero: a bypassed adapter would go unnoticed
    assert type(timm_model.blocks[0].attn.qkv) is not torch.nn.Linear
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(
        class_token_features(timm_model, x), timm_model.forward_features(x)[:, :1], rtol=0, atol=1e-12
    )
