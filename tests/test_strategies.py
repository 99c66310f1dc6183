"""Each strategy trains exactly its tensors: checked by what changes after real optimiser steps."""

import pytest
import torch

from lnshift.backbones import load_backbone
from lnshift.config import FitConfig
from lnshift.errors import ConfigError
from lnshift.strategies import STRATEGIES, StrategyOptions, get_strategy, norm_names
from lnshift.training.heads import build_head
from lnshift.training.ingredients import build_model, plan_phases
from lnshift.training.loop import param_groups, set_trainable

TINY = {"img_size": 32, "patch_size": 8}


def tiny_model(method: str = "ln", head: str = "linear", **cfg_kwargs):
    options = {"model": "lnshift/test-vit", "method": method, "head": head, "model_kwargs": TINY, "pretrained": False}
    cfg = FitConfig.from_dict({**options, **cfg_kwargs})
    backbone = load_backbone(cfg.model.name, pretrained=False, model_kwargs=TINY)
    return cfg, build_model(cfg, backbone, num_classes=3)


def step_and_diff(model, names, steps=2):
    """Train `names` for a few AdamW steps; return the set of parameter names whose values changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = set_trainable(model, names)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_ln_changes_exactly_layernorms_and_head():
    _, model = tiny_model("ln")
    names = get_strategy("ln").select(model, StrategyOptions())
    changed = step_and_diff(model, names)
    norms = set(norm_names(model, StrategyOptions()))
    heads = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert changed == norms | heads
    # by type: every LayerNorm of timm's ViT (2 per block + final norm), weight and bias
    depth = len(model.backbone.model.blocks)
    assert len(norms) == 2 * (2 * depth + 1)
    assert all(".norm" in n for n in norms)


@pytest.mark.parametrize(
    "strategy,expect",
    [
        ("head", lambda n: n.startswith("head.")),
        ("layernorm", lambda n: ".norm" in n and not n.startswith("head.")),
        ("bitfit", lambda n: n.startswith("head.") or n.endswith(".bias")),
        ("full", lambda n: True),
    ],
)
def test_strategy_trainable_sets(strategy, expect):
    _, model = tiny_model("full")
    names = get_strategy(strategy).select(model, StrategyOptions())
    all_names = [n for n, _ in model.named_parameters()]
    assert set(names) == {n for n in all_names if expect(n)}
    assert step_and_diff(model, names) <= set(names)


def test_lora_through_peft_trains_only_adapters_and_head():
    _, model = tiny_model("lora")
    names = get_strategy("lora").select(model, StrategyOptions())
    assert names and all(".lora_" in n or n.startswith("head.") for n in names)
    assert any(".attn.qkv.lora_A" in n for n in names) and any(".attn.proj.lora_B" in n for n in names)
    changed = step_and_diff(model, names)
    assert changed <= set(names) and any("lora_B" in n for n in changed)
    get_strategy("lora").prepare(model, StrategyOptions())  # idempotent: no second adapter
    assert names == get_strategy("lora").select(model, StrategyOptions())


def test_layerscale_is_opt_in():
    backbone = load_backbone("test_vit", pretrained=False, model_kwargs={**TINY, "init_values": 1e-5})
    head = build_head("linear", backbone.feature_dim, backbone.token_dim, 3)
    from lnshift.training.heads import Classifier

    model = Classifier(backbone, head)
    off = norm_names(model, StrategyOptions())
    on = norm_names(model, StrategyOptions(include_layerscale=True))
    extra = set(on) - set(off)
    assert extra and all(n.endswith(".gamma") for n in extra)


def test_weight_decay_policy_spares_1d_parameters():
    _, model = tiny_model("full")
    names = [n for n, _ in model.named_parameters()]
    groups = param_groups(model, names, weight_decay=0.1, decay_1d=False)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), n
    assert all(g["weight_decay"] == 0.1 for g in param_groups(model, names, 0.1, decay_1d=True))


@pytest.mark.parametrize("head", ["linear", "mlp", "attention"])
def test_heads_give_logits(head):
    _, model = tiny_model("ln", head=head)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_cyclic_phases_freeze_the_other_half():
    cfg, model = tiny_model("cyclic", cycles=2, steps=8)
    plans = plan_phases(model, cfg, cfg.optim.steps)
    assert [p.phase.strategy for p in plans] == ["head", "layernorm", "head", "layernorm"]
    heads = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    for plan in plans:
        changed = step_and_diff(model, plan.trainable)
        if plan.phase.strategy == "head":
            assert changed == heads
        else:
            assert changed and not changed & heads


def test_registry_is_complete_and_errors_name_the_strategy():
    assert {"head", "ln", "layernorm", "full", "bitfit", "lora"} <= set(STRATEGIES)
    with pytest.raises(ConfigError, match="nope"):
        get_strategy("nope")
