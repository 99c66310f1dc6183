"""Class-token pooling computes the last block's tail on the class token only: same features, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from lnshift.backbones import load_backbone
from lnshift.backbones.timm_backbone import class_token_features
from lnshift.heads import Classifier, build_head
from lnshift.loop import set_trainable
from lnshift.strategies import StrategyOptions, get_strategy

TINY = {"img_size": 32, "patch_size": 8}


def ln_tuned_pair(model_kwargs: dict) -> tuple[Classifier, Classifier, list[str]]:
    """Two copies of a LN-tuning classifier in train mode (dropout-free); the second takes timm's own path."""
    torch.manual_seed(0)
    backbone = load_backbone("test_vit", None, pretrained=False, model_kwargs=model_kwargs)
    model = Classifier(backbone, build_head("linear", backbone.feature_dim, backbone.token_dim, 4))
    names = get_strategy("ln").select(model, StrategyOptions())
    set_trainable(model, names)
    full = copy.deepcopy(model)
    full.backbone.class_token_only = False
    return model.train(), full.train(), names


@pytest.mark.parametrize("model_kwargs", [TINY, {**TINY, "reg_tokens": 2, "init_values": 0.1}])
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
    backbone = load_backbone("test_vit", None, pretrained=False, model_kwargs=model_kwargs)
    assert not backbone.class_token_only


def test_gradient_checkpointing_takes_timm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = ln_tuned_pair(TINY)
    model.backbone.model.set_grad_checkpointing(True)
    calls = []
    monkeypatch.setattr("lnshift.backbones.timm_backbone.class_token_features", lambda *a: calls.append(a) or None)
    model(torch.randn(2, 3, 32, 32))
    assert not calls
