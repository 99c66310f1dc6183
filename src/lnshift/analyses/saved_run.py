"""A finished run read back as a model, and the analyses over run directories: re-evaluation on new test
sets, merging into one state dict, shift, lambda rescaling, oracle and estimated FSR.

Only the run directory is read (plus the pretrained weights its config names), so runs made on
another machine or GPU count load the same way. `lnshift fit --lambda` runs the rescale (and the FSR
estimate) on a data-parallel run's every process (pipeline.py): rank 0 reads the files and sends what
it read (distributed.from_main), and alone writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import rundir as rd
from ..backbones.timm_backbone import TimmBackbone
from ..config import FitConfig
from ..data import ImageDataset, check_classes, make_transform
from ..data.device import to_device
from ..errors import ConfigError, RunDirError
from ..training import distributed as dist
from ..training.evaluate import evaluate, resolve_device, uses_bf16
from ..training.fit import evaluate_all
from ..training.heads import Classifier, LinearHead
from ..training.ingredients import (
    Images,
    build_model,
    load_configured_backbone,
    loader,
    open_spec,
    resolve_pipeline,
)
from ..training.lambdas import lambda_record, parse_grid, select_lambda
from ..training.loop import restore, store_frozen
from .fsr import FSRReport, oracle_fsr
from .fsr_runs import estimate_fsr
from .shift import ShiftReport, layer_shift, rescale


@dataclass
class SavedRun:
    run: rd.RunDir
    cfg: FitConfig
    model: Classifier
    classes: list[str]
    norms: list[str]
    base: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    meta: dict[str, Any]  # adapter.safetensors' metadata (norms, classes, method, preprocessing)


def load_run(path: str | Path, device: str = "cpu") -> SavedRun:
    """Rebuild the tuned model of a run: pretrained backbone + the tensors of adapter.safetensors."""
    run = rd.RunDir(path)

    def read() -> tuple[dict[str, Any], tuple[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]:
        run.require(rd.CONFIG, rd.BASE, rd.ADAPTER)
        return run.read_config()["fit"], run.read_tensors(rd.ADAPTER), run.read_tensors(rd.BASE)[0]

    options, (adapter, meta), base = dist.from_main(read)
    dev = resolve_device(device)
    cfg = FitConfig.from_dict(options, source=str(run / rd.CONFIG))
    model = build_model(cfg, load_configured_backbone(cfg, dev), len(meta["classes"]))
    unknown = sorted(set(adapter) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise RunDirError(f"{run / rd.ADAPTER}: tensors not in the rebuilt model: {unknown[:5]}")
    restore(model, adapter)
    if cfg.optim.frozen_dtype == "bf16" and uses_bf16(dev, cfg.optim.precision):  # as it was trained and evaluated
        store_frozen(model, list(adapter), torch.bfloat16)
    model.eval().to(dev)
    return SavedRun(run, cfg, model, meta["classes"], meta["norms"], base, adapter, meta)


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
            cfg.optim.precision,
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
    """Write the tuned model as one plain safetensors state dict; its metadata says how to rebuild it.

    `lnshift.*`: the model as `lnshift fit` names it (`--model`, `--model-kwargs`, head), classes and
    preprocessing (timm's `create_transform` keywords). A timm backbone with a linear head also gets
    `timm.architecture` and `timm.kwargs`: `timm.create_model(architecture, **kwargs)` loads the state
    dict as it is (constructor arguments that are classes, such as UNI2-h's SwiGLU layer, appear by name).
    """
    saved = load_run(path, "cpu")
    model: nn.Module = saved.model
    meta: dict[str, Any] = {
        "lnshift.data_config": model.backbone.data_config,
        "lnshift.classes": saved.classes,
        "lnshift.model": saved.cfg.model.name,
        "lnshift.model_kwargs": saved.cfg.model.kwargs,
        "lnshift.head": saved.cfg.method.head,
        "lnshift.run": str(saved.run.path),
    }
    backbone = model.backbone
    if isinstance(backbone, TimmBackbone) and isinstance(model.head, LinearHead):
        meta["timm.architecture"] = backbone.model.pretrained_cfg["architecture"]
        kwargs = {**backbone.timm_kwargs, "num_classes": len(saved.classes)}
        meta["timm.kwargs"] = json.dumps(kwargs, default=lambda obj: f"{obj.__module__}.{obj.__qualname__}")
    rd.write_tensors(out, merged_state_dict(saved.model), meta)
    return Path(out)


def split_datasets(saved: SavedRun) -> dict[str, Images]:
    """Evaluation datasets of every split in splits.json, tagged with their split name.

    On the device pipeline when the run's --input-pipeline chooses it on this device (images cached
    once per process).
    """
    splits = dist.from_main(lambda: saved.run.read_json(rd.SPLITS))
    data_config = saved.model.backbone.data_config
    transform = make_transform(data_config, train=False)
    device = next(saved.model.parameters()).device
    sizes = {name: len(split["indices"]) for name, split in splits["splits"].items()}
    on_device = resolve_pipeline(saved.cfg, sizes, device, data_config) == "device"
    out: dict[str, Images] = {}
    for name, split in splits["splits"].items():
        ds = ImageDataset(open_spec(split["source"], saved.cfg), split["indices"], splits["class_to_idx"], transform)
        ds.split = name
        out[name] = to_device(ds, data_config, device, crops=False) if on_device else ds
    return out


def trained_norms(saved: SavedRun) -> list[str]:
    return [m for m in saved.norms if f"{m}.weight" in saved.adapter]


def finetuned_tensors(saved: SavedRun) -> dict[str, torch.Tensor]:
    """Tuned values before any lambda rescaling: what the LayerNorm shift and FSR are about."""
    path = saved.run / rd.FINETUNED
    finetuned = dist.from_main(lambda: saved.run.read_tensors(rd.FINETUNED)[0] if path.exists() else None)
    return saved.adapter if finetuned is None else finetuned


def shift_of_run(path: str | Path, write: bool = True) -> ShiftReport:
    """Per-layer LayerNorm shift of the run's model as saved (adapter vs base); writes shift.json."""
    saved = load_run(path)
    norms = trained_norms(saved)
    if not norms:
        raise RunDirError(
            f"{saved.run.path}: method {saved.cfg.method.name!r} tuned no LayerNorm, so there is no shift"
        )
    report = layer_shift(saved.base, saved.adapter, norms)
    if write:
        rd.write_json(saved.run / rd.SHIFT, report.to_dict())
    return report


def rescale_run(
    path: str | Path,
    lam: str,
    *,
    target: str = "gamma",
    out: str | Path | None = None,
    grid: str | None = None,
    score_grid: bool = False,
    device: str = "auto",
    progress: bool = True,
    finish: bool = True,
) -> dict[str, Any]:
    """Rescale a run's LayerNorm shift by lambda (a number, 'auto' on validation, or 'fsr') into a new run.

    Lambda always applies to the fine-tuned values (finetuned.safetensors when the run was rescaled
    before), so rescaling twice never compounds and lambda = 1 restores the fine-tuned model exactly.
    Without `out` the run is rescaled in place. The validation grid (`grid`, by default the run's
    --lambda-grid) is scored for 'auto', and for a given or 'fsr' lambda only with `score_grid`.
    `finish=False` leaves DONE to the caller (`lnshift fit --lambda` logs the outcome first).
    """
    if grid is not None and lam != "auto" and not score_grid:
        raise ConfigError(f"a grid is scored for --lambda auto or with --score-grid, not for --lambda {lam}")
    saved = load_run(path, device)
    norms = trained_norms(saved)
    if not norms:
        raise RunDirError(f"{saved.run.path}: method {saved.cfg.method.name!r} tuned no LayerNorm; nothing to rescale")
    finetuned = finetuned_tensors(saved)
    model, dev = saved.model, next(saved.model.parameters()).device
    restore(model, finetuned)
    datasets = split_datasets(saved)
    n_classes = len(saved.classes)
    curve = None
    if lam == "auto" or score_grid:
        curve = select_lambda(
            model,
            norms,
            saved.base,
            finetuned,
            datasets["val"],
            n_classes,
            dev,
            grid=parse_grid(grid or saved.cfg.method.lambda_grid),
            target=target,
            batch_size=saved.cfg.runtime.eval_batch_size,
            precision=saved.cfg.optim.precision,
            progress=progress,
        )
    record = dist.from_main(lambda: lambda_record(curve, lam, saved.run, target))  # 'fsr' reads fsr_estimate.json
    adapter = {**finetuned, **rescale(saved.base, finetuned, norms, record["lambda"], target)}
    restore(model, adapter)
    dest = rd.RunDir(out) if out is not None else saved.run
    if out is not None:
        record["source_run"] = str(saved.run.path)
        dest.prepare(resume=False, overwrite=False)
        for name in (rd.CONFIG, rd.SPLITS, rd.BASE, rd.CYCLES):
            if (saved.run / name).exists():
                shutil.copyfile(saved.run / name, dest / name)
    rd.write_tensors(dest / rd.FINETUNED, finetuned, saved.meta)
    rd.write_tensors(dest / rd.ADAPTER, adapter, saved.meta)
    rd.write_json(dest / rd.LAMBDA, record)
    rd.write_json(dest / rd.SHIFT, layer_shift(saved.base, adapter, norms).to_dict())
    cfg = saved.cfg
    tests = {name.removeprefix("test:"): ds for name, ds in datasets.items() if name.startswith("test:")}
    metrics = evaluate_all(model, datasets["val"], tests, n_classes, cfg.replace(progress=progress), dev)
    rd.write_json(dest / rd.METRICS, metrics)
    if finish:
        dest.mark_done()
    return {"run": str(dest.path), "metrics": metrics, **record}


def run_budget(run: rd.RunDir) -> dict[str, Any]:
    phases = run.read_json(rd.CYCLES)["phases"]
    return {"steps": sum(p["steps"] for p in phases), "phases": [p["phase"] for p in phases]}


def fsr_of_run(path: str | Path, reference: str | Path) -> FSRReport:
    """Oracle FSR of a run against a reference run on fully representative data; writes fsr.json."""
    saved, ref = load_run(path), load_run(reference)
    norms, ref_norms = trained_norms(saved), trained_norms(ref)
    if not norms or norms != ref_norms:
        raise RunDirError(f"{saved.run.path} and {ref.run.path} must tune the same LayerNorms to compare shifts")
    run_b, ref_b = run_budget(saved.run), run_budget(ref.run)
    budget = {"run_steps": run_b["steps"], "reference_steps": ref_b["steps"], "reference": str(ref.run.path)}
    report = oracle_fsr(
        layer_shift(saved.base, finetuned_tensors(saved), norms),
        layer_shift(ref.base, finetuned_tensors(ref), norms),
        budget,
    )
    rd.write_json(saved.run / rd.FSR, report.to_dict())
    return report


def estimate_fsr_of_run(path: str | Path, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """FSR estimated from the run's own training data (nested-subset runs under RUN_DIR/fsr-estimate/)."""
    saved = load_run(path)
    norms = trained_norms(saved)
    if not norms:
        raise RunDirError(f"{saved.run.path}: method {saved.cfg.method.name!r} tuned no LayerNorm; FSR is undefined")
    shift = layer_shift(saved.base, finetuned_tensors(saved), norms).to_dict()
    n_train, steps = dist.from_main(
        lambda: (len(saved.run.read_json(rd.SPLITS)["splits"]["train"]["indices"]), run_budget(saved.run)["steps"])
    )
    result = estimate_fsr(saved.cfg, saved.run.path, n_train, shift, steps, echo)
    rd.write_json(saved.run / rd.FSR_ESTIMATE, result)
    return result
