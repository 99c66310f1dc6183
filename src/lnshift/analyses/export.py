"""A run as a PEFT adapter: LN tuning of the plain timm model plus its classification head.

`peft.PeftModel.from_pretrained(timm_model, DIR)` then rebuilds lnshift's tuned model from the timm
model the run's backbone came from (its pretrained weights, `num_classes` = the run's class count).
The folder is written by peft itself (`LNTuningConfig`, `get_peft_model`, `save_pretrained`), so its
format is whatever the installed peft reads; `lnshift.json` beside it says how to build that timm model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .. import rundir as rd
from ..backbones.timm_backbone import TimmBackbone
from ..errors import ConfigError, ModelError, RunDirError
from ..training.heads import LinearHead
from ..training.loop import restore
from .saved_run import SavedRun, load_run, merged_state_dict, trained_norms

PREFIX = "backbone.model."  # lnshift's names of the timm model's parameters (heads.Classifier)
INFO = "lnshift.json"


def _check_exportable(saved: SavedRun) -> list[str]:
    """The timm names of the tuned norms; an error for what PEFT's LN tuning plus a saved head cannot hold."""
    where = f"{saved.run.path}"
    if not isinstance(saved.model.backbone, TimmBackbone):
        raise ConfigError(
            f"{where}: PEFT export supports timm backbones only; --model {saved.cfg.model.name!r} is a "
            f"{saved.model.backbone.family} model"
        )
    if not isinstance(saved.model.head, LinearHead):
        raise ConfigError(f"{where}: PEFT export supports --head linear only, not --head {saved.cfg.method.head!r}")
    norms = trained_norms(saved)
    held = {f"{m}.{p}" for m in norms for p in ("weight", "bias")} | {"head.fc.weight", "head.fc.bias"}
    other = sorted(set(saved.adapter) - held)
    if other:
        raise ConfigError(
            f"{where}: --method {saved.cfg.method.name!r} tuned tensors that are neither norms nor the head, which "
            f"PEFT's LN tuning cannot hold: {other[:5]}" + (f" (+{len(other) - 5} more)" if len(other) > 5 else "")
        )
    if not norms:
        raise ConfigError(
            f"{where}: --method {saved.cfg.method.name!r} tuned no LayerNorm; there is no LN tuning to export"
        )
    return [m.removeprefix(PREFIX) for m in norms]


def _plain_timm(saved: SavedRun) -> nn.Module:
    """A fresh plain timm model holding the run's model as it is now (timm names, `num_classes` outputs)."""
    backbone = saved.model.backbone
    arch = backbone.model.pretrained_cfg["architecture"]
    model = timm.create_model(arch, pretrained=False, **{**backbone.timm_kwargs, "num_classes": len(saved.classes)})
    try:
        model.load_state_dict(merged_state_dict(saved.model))
    except RuntimeError as err:  # a timm model whose classifier is not a linear `head`
        raise ModelError(f"{saved.run.path}: the run's model does not fit plain timm {arch!r}: {err}") from err
    return model.eval()


def base_timm_model(run: str | Path) -> nn.Module:
    """The plain timm model a run started from: its backbone's pretrained weights, untrained head of its class count.

    This is the `timm_model` that `PeftModel.from_pretrained` expects; outside lnshift it is
    `timm.create_model(architecture, **kwargs)` of `lnshift.json` with the same pretrained weights.
    """
    saved = load_run(run, "cpu")
    _check_exportable(saved)
    restore(saved.model, saved.base)  # the tuned norms and head back to their values before training
    return _plain_timm(saved)


def run_info(saved: SavedRun) -> dict[str, Any]:
    """What `lnshift.json` records: how to build the timm model, the classes and the preprocessing."""
    backbone = saved.model.backbone
    kwargs = {**backbone.timm_kwargs, "num_classes": len(saved.classes)}
    return {
        "timm.architecture": backbone.model.pretrained_cfg["architecture"],
        # constructor arguments that are classes (UNI2-h's SwiGLU layer) appear by name, as in `lnshift merge`
        "timm.kwargs": json.loads(json.dumps(kwargs, default=lambda obj: f"{obj.__module__}.{obj.__qualname__}")),
        "classes": saved.classes,
        "data_config": backbone.data_config,
        "lnshift.model": saved.cfg.model.name,
        "lnshift.run": str(saved.run.path),
    }


def export_peft(run: str | Path, out: str | Path) -> Path:
    """Write the run as a PEFT LN-tuning adapter folder (the head as a module to save) at `out`.

    Args:
        run: a finished run directory of a timm backbone with a linear head and tuned LayerNorms
            (methods that tune other tensors, such as LoRA or full fine-tuning, are refused).
        out: the folder to create; it must not exist or be empty. It appears whole or not at all.

    Returns:
        `out`, holding peft's `adapter_config.json` and `adapter_model.safetensors`, and `lnshift.json`.
    """
    from peft import LNTuningConfig, get_peft_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--peft {out} already exists; choose a new folder or remove it")
    saved = load_run(run, "cpu")
    norms = _check_exportable(saved)
    model = _plain_timm(saved)
    head = next(name for name, module in model.named_modules() if module is model.get_classifier())
    clashes = [name for name, _ in model.named_modules() if name.endswith(head) and name != head]
    if clashes:  # peft picks modules to save by the end of their name
        raise ModelError(f"{saved.run.path}: modules {clashes[:5]} would be saved with the head {head!r}")
    config = LNTuningConfig(target_modules="|".join(map(re.escape, norms)), modules_to_save=[head])
    with warnings.catch_warnings():  # peft's generic warning for a layer without in/out features (every norm)
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        peft_model = get_peft_model(model, config)  # copies of the tuned norms and head: the adapter
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        peft_model.save_pretrained(tmp)
        rd.write_json(tmp / INFO, run_info(saved))
        mode = rd.plain_write_mode(out)  # mkdtemp's 0700 would hide the folder from other users
        os.chmod(tmp, mode | (mode & 0o444) >> 2)  # searchable where readable
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
