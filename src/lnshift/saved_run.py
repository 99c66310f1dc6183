"""A finished run read back as a model: re-evaluation on new test sets, and merging into one state dict.

Only the run directory is read (plus the pretrained weights its config names), so runs made on
another machine or GPU count load the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import rundir as rd
from .config import FitConfig
from .data import ImageDataset, check_classes, make_transform
from .errors import RunDirError
from .evaluate import evaluate, resolve_device
from .fit import build_model, load_configured_backbone, loader, open_spec
from .heads import Classifier, LinearHead
from .loop import restore


@dataclass
class SavedRun:
    run: rd.RunDir
    cfg: FitConfig
    model: Classifier
    classes: list[str]
    norms: list[str]
    base: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]


def load_run(path: str | Path, device: str = "cpu") -> SavedRun:
    """Rebuild the tuned model of a run: pretrained backbone + the tensors of adapter.safetensors."""
    run = rd.RunDir(path)
    run.require(rd.CONFIG, rd.BASE, rd.ADAPTER)
    cfg = FitConfig.from_dict(run.read_config()["fit"], source=str(run / rd.CONFIG))
    adapter, meta = run.read_tensors(rd.ADAPTER)
    base, _ = run.read_tensors(rd.BASE)
    model = build_model(cfg, load_configured_backbone(cfg), len(meta["classes"]))
    unknown = sorted(set(adapter) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise RunDirError(f"{run / rd.ADAPTER}: tensors not in the rebuilt model: {unknown[:5]}")
    restore(model, adapter)
    model.eval().to(resolve_device(device))
    return SavedRun(run, cfg, model, meta["classes"], meta["norms"], base, adapter)


def evaluate_run(
    path: str | Path, tests: dict[str, str], device: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Score a saved run on named test sets and record them in its metrics.json."""
    saved = load_run(path, device)
    cfg = saved.cfg
    transform = make_transform(saved.model.backbone.data_config, train=False)
    class_to_idx = {c: i for i, c in enumerate(saved.classes)}
    dev = next(saved.model.parameters()).device
    results = {}
    for name, spec in tests.items():
        source = open_spec(spec, cfg)
        check_classes(saved.classes, source, f"test:{name}")
        ds = ImageDataset(source, range(len(source)), class_to_idx, transform)
        results[name] = evaluate(
            saved.model,
            loader(ds, cfg, train=False),
            len(saved.classes),
            dev,
            cfg.precision,
            f"test:{name}",
            progress,
        )
        results[name]["source"] = spec
    metrics = saved.run.read_json(rd.METRICS) if (saved.run / rd.METRICS).exists() else {"test": {}}
    metrics.setdefault("test", {}).update(results)
    rd.write_json(saved.run / rd.METRICS, metrics)
    return results


def merged_state_dict(model: Classifier) -> dict[str, torch.Tensor]:
    """The backbone's native state dict with LoRA folded in, plus the head (timm naming for a linear head)."""
    backbone = model.backbone.model
    for module in backbone.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge"):
            module.merge()
    state = {}
    for name, tensor in backbone.state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    head = model.head
    if isinstance(head, LinearHead):
        state["head.weight"], state["head.bias"] = head.fc.weight, head.fc.bias
    else:
        state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def merge_run(path: str | Path, out: str | Path) -> Path:
    """Write the tuned model as one plain safetensors state dict, preprocessing in its metadata."""
    saved = load_run(path, "cpu")
    model: nn.Module = saved.model
    meta = {
        "lnshift.data_config": model.backbone.data_config,
        "lnshift.classes": saved.classes,
        "lnshift.model": saved.cfg.model,
        "lnshift.run": str(saved.run.path),
    }
    rd.write_tensors(out, merged_state_dict(saved.model), meta)
    return Path(out)
