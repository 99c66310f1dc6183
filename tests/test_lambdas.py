"""Lambda selection: the batched grid equals one-by-one rescaled models, and only validation may select."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lnshift.analyses.shift import rescale
from lnshift.backbones import load_backbone
from lnshift.config import FitConfig
from lnshift.errors import ConfigError
from lnshift.strategies import StrategyOptions, get_strategy, norm_module_names
from lnshift.training.ingredients import build_model
from lnshift.training.lambdas import choose, grid_logits, select_lambda
from lnshift.training.loop import restore, snapshot

TINY = {"img_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def tuned_model():
    cfg = FitConfig.from_dict({"model": "lnshift/test-vit", "model_kwargs": TINY})
    model = build_model(cfg, load_backbone(cfg.model.name, pretrained=False, model_kwargs=TINY), num_classes=3).eval()
    names = get_strategy("ln").select(model, StrategyOptions())
    base = snapshot(model, names)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a synthetic "fine-tuned" state: every LayerNorm moved
        for n, p in model.named_parameters():
            if n in names:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, names, base, snapshot(model, names), norm_module_names(model, StrategyOptions())


def tagged(split, n=10):
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(n) % 3)
    if split is not None:
        ds.split = split
    return ds


@pytest.mark.parametrize("target", ["gamma", "beta", "both"])
def test_batched_grid_equals_one_by_one(tuned_model, target):
    model, _names, base, tuned, norms = tuned_model
    grid = [0.0, 0.5, 1.0, 2.5, -1.0]
    loader = DataLoader(tagged("val"), batch_size=4)
    logits, _labels, passes = grid_logits(model, norms, base, tuned, grid, loader, torch.device("cpu"), "fp32", target)
    assert logits.shape == (5, 10, 3) and passes == 3
    for k, lam in enumerate(grid):
        restore(model, rescale(base, tuned, norms, lam, target))
        with torch.no_grad():
            expected = torch.cat([model(x) for x, _ in loader])
        assert torch.allclose(logits[k], expected, atol=1e-5), lam
    restore(model, tuned)
    with torch.no_grad():  # the patch is removed afterwards: the model is unchanged
        assert torch.allclose(torch.cat([model(x) for x, _ in loader]), logits[2], atol=1e-5)


@pytest.mark.parametrize("split", ["test:sketch", "train", None])
def test_selection_refuses_anything_but_validation(tuned_model, split):
    model, _, base, tuned, norms = tuned_model
    with pytest.raises(ConfigError, match="validation split only"):
        select_lambda(model, norms, base, tuned, tagged(split), 3, torch.device("cpu"))


def test_selection_on_validation_records_the_curve(tuned_model):
    model, _, base, tuned, norms = tuned_model
    curve = select_lambda(model, norms, base, tuned, tagged("val"), 3, torch.device("cpu"), grid=[0, 1, 2])
    record = curve.to_dict()
    assert record["selected_on"] == "val" and [c["lambda"] for c in record["curve"]] == [0, 1, 2]
    best = max(c["accuracy"] for c in record["curve"])
    assert record["lambda"] in [c["lambda"] for c in record["curve"] if c["accuracy"] == best]
    assert record["cost"]["batched_forward_passes"] >= 1


def test_ties_prefer_the_least_change():
    metrics = [{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.7}, {"accuracy": 0.7}]
    assert choose([0.0, 0.5, 1.25, 3.0], metrics) == 1.25
