"""lnshift's bundled models (src/lnshift/assets, recipes in pretrain/): each loads offline with exactly its
file's weights and preprocessing, and `lnshift fit --model NAME` trains on PACS with a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lnshift.backbones import load_backbone, registry
from lnshift.cli import main

ASSETS = Path(registry.__file__).resolve().parents[1] / "assets"
BUNDLED = [name for name in registry.list_models() if registry.get(name).weights]


def test_both_bundled_models_are_registered() -> None:
    assert {"lnshift/vit-tiny-cifar10", "lnshift/vit-tiny-in200-sup"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_loads_its_file_offline(name: str) -> None:
    path = ASSETS / registry.get(name).weights
    with safe_open(str(path), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        preprocessing = json.loads(f.metadata()["lnshift.data_config"])
    backbone = load_backbone(name)
    state = backbone.model.state_dict()
    assert set(stored) == set(state)
    for key, tensor in stored.items():
        assert tensor.dtype == torch.float16  # shipped in fp16
        torch.testing.assert_close(state[key], tensor.float(), rtol=0, atol=0)
    assert {k: backbone.data_config[k] for k in preprocessing} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items()
    }
    assert path.stat().st_size <= 12 * 2**20
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 192) and features.isfinite().all()


def test_fit_trains_the_tiny_imagenet_model_on_pacs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["fit", "--model", "lnshift/vit-tiny-in200-sup", "--method", "ln", "--out", str(out)]
    args += ["--train", "builtin:pacs-mini/photo", "--shots", "2", "--test", "sketch=builtin:pacs-mini/sketch"]
    args += ["--steps", "4", "--batch-size", "8", "--workers", "0", "--progress", "false", "--device", "cpu"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test"]["sketch"]["accuracy"] <= 1
    assert "lnshift/vit-tiny-in200-sup" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("name", BUNDLED)
def test_registry_architecture_is_the_one_pretrain_builds(name: str) -> None:
    """pretrain/ runs without lnshift on the GPU, so it keeps its own copy of the layout: the two must agree."""
    path = ASSETS / registry.get(name).weights
    with safe_open(str(path), "pt") as f:
        recipe = json.loads(f.metadata()["lnshift.recipe"])
    assert recipe["model_kwargs"] == registry.get(name).model_kwargs
