"""Training one run: backbone -> data -> phases -> loop -> artifacts, top to bottom.

The run directory it writes (see rundir.py) is all that evaluation, shift, FSR, merge and reports read.
A lambda applied once at the end is not training but an analysis of the trained run: training then
leaves the run open (no metrics, no DONE) for pipeline.py to rescale and finish. Lambda between cycles
shapes what later phases learn, so that one is applied here. What a run is made of (data, backbone,
model, phases, loaders) is built from its config in ingredients.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import rundir as rd
from ..analyses.shift import ShiftReport, layer_shift, rescale
from ..config import FitConfig, environment
from ..errors import ConfigError, RunDirError
from ..strategies import norm_module_names
from . import distributed as dist
from .evaluate import evaluate, uses_bf16
from .heads import Classifier
from .ingredients import (
    Data,
    Images,
    build_model,
    input_pipeline,
    load_configured_backbone,
    load_images,
    loader,
    plan_phases,
    prepare_data,
    resolved,
    run_length,
    trained_names,
)
from .lambdas import lambda_record, parse_grid, select_lambda
from .loop import PhasePlan, PhaseState, restore, run_phase, seed_everything, snapshot, store_frozen
from .phases import budget_factor, budget_rule


def changed_options(run: rd.RunDir, cfg: FitConfig) -> list[str]:
    """Options, other than runtime ones, in which `cfg` differs from the config the run was made with."""
    return cfg.changed_from(run.read_config().get("fit", {}))


def check_resume(run: rd.RunDir, cfg: FitConfig) -> None:
    if not (run / rd.CONFIG).exists():  # only a search's candidates so far (a batched sweep trains them first)
        return
    differ = changed_options(run, cfg)
    if differ:
        raise RunDirError(f"--resume: options differ from the interrupted run in {run.path}: {differ}")


@dataclass
class Trainee:
    """A run being made: its directory and log, data, model, phases and the pretrained values of what trains."""

    run: rd.RunDir
    log: rd.EventLog
    data: Data
    model: Classifier
    plans: list[PhasePlan]
    names: list[str]
    norms: list[str]  # the norm modules whose gamma trains
    base: dict[str, torch.Tensor]
    meta: dict[str, Any]


def start_run(cfg: FitConfig, echo: Callable[[str], None] | None) -> tuple[rd.RunDir, rd.EventLog]:
    """Create (or reopen, with --resume) the run directory and its log; write config.yaml."""
    run = rd.RunDir(cfg.runtime.out)
    dist.from_main(partial(run.prepare, resume=cfg.runtime.resume, overwrite=cfg.runtime.overwrite))
    if cfg.runtime.resume:
        dist.from_main(partial(check_resume, run, cfg))
    if dist.is_main():
        (run / rd.FAILED).unlink(missing_ok=True)  # an earlier attempt diverged; this one is tried afresh
    log = rd.EventLog(run, echo, tensorboard=cfg.runtime.tensorboard)
    log.event("start", resume=cfg.runtime.resume)
    rd.write_yaml(run / rd.CONFIG, {"fit": cfg.to_dict(), "environment": environment(), "command": sys.argv})
    return run, log


def train_run(
    cfg: FitConfig, device: torch.device, echo: Callable[[str], None] | None, *, score_tests: bool = True
) -> rd.RunDir:
    """Train one configuration (no grid) on this process's device and write its run directory; returns it.

    Inside the process group if there is one (pipeline.fit sets it up). `score_tests=False` leaves the
    test sets unscored (a search's candidates).
    """
    run, log = start_run(cfg, echo)
    seed_everything(cfg.optim.seed)
    trainee = build(cfg, device, run, log)
    phases = train(trainee, cfg, device)
    finish(trainee, cfg, device, phases, score_tests)
    return run


def build(cfg: FitConfig, device: torch.device, run: rd.RunDir, log: rd.EventLog) -> Trainee:
    """Backbone, data (splits.json), model and phases of a run; base.safetensors holds what trains, pretrained."""
    backbone = load_configured_backbone(cfg, device, training=True)
    data = prepare_data(cfg, backbone.data_config)
    model = build_model(cfg, backbone, len(data.classes)).to(device)
    rd.write_json(run / rd.SPLITS, data.splits)
    if len(data.train) == 0:
        raise ConfigError("the training split is empty")
    sources = {id(d.source): d.source for d in data.named().values()}.values()
    pipeline = input_pipeline(cfg, data, device, backbone.data_config)
    data = load_images(data, cfg, device, backbone.data_config, pipeline)
    log.info(f"input pipeline: {pipeline}" + (" (decoded images on the device)" if pipeline == "device" else ""))
    log.info(f"fast paths: {', '.join(backbone.fast_paths) or 'none'} (--fast-paths {cfg.runtime.fast_paths})")
    if dist.is_main():
        rd.write_yaml(run / rd.CONFIG, {**run.read_config(), "resolved": resolved(backbone, pipeline)})
    for source in sources:
        if source.converted:
            modes = ", ".join(f"{n} from {m}" for m, n in sorted(source.converted.items()))
            log.info(f"note: {source.spec}: images converted to RGB ({modes})")
    for name, paths in data.splits["skipped_bad_images"].items():
        log.info(f"skipped {len(paths)} undecodable image(s) of {name}: {', '.join(paths[:10])}")
    for name, pairs in data.splits["duplicates_with_test"].items():
        shown = ", ".join(f"{a} = {b}" for a, b in pairs[:5])
        log.info(f"WARNING: {len(pairs)} test image(s) are byte-identical to {name.split('~')[0]} images: {shown}")
    log.info(
        f"{cfg.model.name} | {len(data.classes)} classes | train {len(data.train)}, val {len(data.val)}, "
        + ", ".join(f"test:{k} {len(v)}" for k, v in data.tests.items())
    )

    plans = plan_phases(model, cfg, run_length(cfg, data.train))
    names = trained_names(plans)
    if cfg.optim.frozen_dtype == "bf16":
        if not uses_bf16(device, cfg.optim.precision):
            raise ConfigError("--frozen-dtype bf16 needs bf16 autocast: --precision bf16, or auto on a GPU")
        log.info(f"frozen weights stored in bf16: {store_frozen(model, names, torch.bfloat16):,} values")
    meta = tensor_meta(model, cfg, data.classes)
    if not (run / rd.BASE).exists():
        rd.write_tensors(run / rd.BASE, snapshot(model, names), meta)
    base = dist.from_main(lambda: run.read_tensors(rd.BASE)[0])
    norms = [m for m in meta["norms"] if f"{m}.weight" in names]
    return Trainee(run, log, data, model, plans, names, norms, base, meta)


def train(t: Trainee, cfg: FitConfig, device: torch.device) -> list[dict[str, Any]]:
    """Run the phases not yet done (resuming from the checkpoint); returns each phase's record (cycles.json)."""
    model, data, names = t.model, t.data, t.names
    done_phases: list[dict] = []
    resume_state: PhaseState | None = None

    def save_checkpoint(state: PhaseState | None) -> None:
        save_resume_state(t.run, snapshot(model, names), done_phases, state)

    ckpt = dist.from_main(lambda: load_resume_state(t.run) if cfg.runtime.resume else None)  # rank 0 reads, all restore
    if ckpt is not None:
        tensors, done_phases, resume_state = ckpt
        restore(model, tensors)
        t.log.info(f"resuming after phase {len(done_phases)} epoch {resume_state.epoch if resume_state else 0}")

    validate = partial(
        evaluate, model, loader(data.val, cfg, train=False), len(data.classes), device, cfg.optim.precision
    )
    for plan in t.plans[len(done_phases) :]:
        state = run_phase(
            model,
            plan,
            cfg,
            lambda g: loader(data.train, cfg, train=True, generator=g),
            validate,
            device,
            t.log,
            save_checkpoint,
            resume_state,
        )
        resume_state = None
        record = {"phase": plan.phase.name, "strategy": plan.phase.strategy, "steps": plan.steps}
        record.update(best_epoch=state.best_epoch, history=state.history)
        if t.norms:
            record.update(totals(layer_shift(t.base, snapshot(model, names), t.norms)))
        if plan.phase.rescale_after and cfg.method.lam is not None:
            record["lambda"] = apply_lambda(model, cfg, t.norms, t.base, names, data, device)
            record["val_after_lambda"] = validate()["accuracy"]
        done_phases.append(record)
        save_checkpoint(None)
    return done_phases


def save_resume_state(
    run: rd.RunDir, tensors: dict[str, torch.Tensor], done_phases: list[dict], state: PhaseState | None
) -> None:
    """The checkpoint as one safetensors file with JSON metadata: atomic, and loading it runs no pickled code."""
    packed, record = state.pack() if state is not None else ({}, None)
    model = {f"model/{n}": t for n, t in tensors.items()}
    rd.write_tensors(run / rd.CHECKPOINT_STATE, {**model, **packed}, {"done_phases": done_phases, "state": record})


def load_resume_state(run: rd.RunDir) -> tuple[dict[str, torch.Tensor], list[dict], PhaseState | None] | None:
    """The trained tensors, finished phases' records and the unfinished phase's state; None with no checkpoint."""
    if not (run / rd.CHECKPOINT_STATE).exists():
        return None
    tensors, meta = run.read_tensors(rd.CHECKPOINT_STATE)
    model = {n.removeprefix("model/"): t for n, t in tensors.items() if n.startswith("model/")}
    rest = {n: t for n, t in tensors.items() if not n.startswith("model/")}
    state = None if meta["state"] is None else PhaseState.unpack(rest, meta["state"])
    return model, meta["done_phases"], state


def finish(t: Trainee, cfg: FitConfig, device: torch.device, phases: list[dict[str, Any]], score_tests: bool) -> None:
    """After training: the run's outcome (and DONE, unless a final lambda is still to come)."""
    data = t.data if score_tests else replace(t.data, tests={})
    write_outcome(t.run, t.model, t.names, t.norms, t.base, t.meta, data, cfg, device, t.log, phases)


def tensor_meta(model: Classifier, cfg: FitConfig, classes: list[str]) -> dict[str, Any]:
    """What base/adapter.safetensors carry beside the tensors: norms, classes, method, preprocessing."""
    norms = norm_module_names(model, cfg.method.strategy)
    return {"norms": norms, "classes": classes, "method": cfg.method.name, "data_config": model.backbone.data_config}


def write_outcome(
    run: rd.RunDir,
    model: nn.Module,
    names: list[str],
    norms: list[str],
    base: dict[str, torch.Tensor],
    meta: dict[str, Any],
    data: Data,
    cfg: FitConfig,
    device: torch.device,
    log: rd.EventLog,
    phases: list[dict[str, Any]],
) -> None:
    """A trained model's adapter, shift and phase history; then its metrics and DONE.

    With a final lambda (`cfg.method.final_lambda`) the run stays open after the phase history, checkpoint
    included: the rescaled model is what gets scored, and an interrupted rescale resumes from here.
    """
    adapter = snapshot(model, names)
    rd.write_tensors(run / rd.ADAPTER, adapter, meta)
    if norms:
        rd.write_json(run / rd.SHIFT, layer_shift(base, adapter, norms).to_dict())
    rd.write_json(run / rd.CYCLES, {"phases": phases, "budget": budget_record(cfg, phases)})
    if cfg.method.final_lambda:
        return
    metrics = evaluate_all(model, data.val, data.tests, len(data.classes), cfg, device)
    rd.write_json(run / rd.METRICS, metrics)
    log.info("metrics: " + summarize(metrics))
    close_run(run, log)


def close_run(run: rd.RunDir, log: rd.EventLog) -> None:
    """The last step of every run: the 'done' event, then DONE (which drops the resume state)."""
    log.event("done")
    run.mark_done()


def budget_record(cfg: FitConfig, phases: list[dict[str, Any]]) -> dict[str, Any]:
    """cycles.json's budget: the --steps / --epochs budget in steps, how the method spent it, the steps trained."""
    steps = sum(p["steps"] for p in phases)
    factor = budget_factor(cfg.method.name, cfg.method.cycles)
    return {"rule": budget_rule(cfg.method.name), "budget_steps": steps // factor, "factor": factor, "steps": steps}


def apply_lambda(
    model: nn.Module, cfg: FitConfig, norms: list[str], base: dict, names: list[str], data: Data, device: torch.device
) -> float:
    """Choose lambda between cycles (a number, or on validation), rescale the LayerNorms in place; returns it."""
    tuned = snapshot(model, names)
    curve = select_lambda(
        model,
        norms,
        base,
        tuned,
        data.val,
        len(data.classes),
        device,
        grid=parse_grid(cfg.method.lambda_grid),
        target=cfg.method.lambda_target,
        batch_size=cfg.runtime.eval_batch_size,
        precision=cfg.optim.precision,
    )
    lam = lambda_record(curve, cfg.method.lam, rd.RunDir(cfg.runtime.out))[
        "lambda"
    ]  # no 'fsr' between cycles: nothing is read
    restore(model, rescale(base, tuned, norms, lam, cfg.method.lambda_target))
    return lam


def evaluate_all(
    model: nn.Module,
    val: Images,
    tests: dict[str, Images],
    num_classes: int,
    cfg: FitConfig,
    device: torch.device,
) -> dict[str, Any]:
    """metrics.json content: the validation split and every named test set."""
    ev = partial(
        evaluate, num_classes=num_classes, device=device, precision=cfg.optim.precision, progress=cfg.runtime.progress
    )
    return {
        "val": ev(model, loader(val, cfg, train=False), desc="val"),
        "test": {k: ev(model, loader(ds, cfg, train=False), desc=f"test:{k}") for k, ds in tests.items()},
    }


def totals(shift: ShiftReport) -> dict[str, float]:
    return {"shift_gamma": shift.shift_gamma, "shift_beta": shift.shift_beta, "shift_ln": shift.shift_ln}


def summarize(metrics: dict[str, Any]) -> str:
    parts = [f"val acc {metrics['val']['accuracy']:.4f}"]
    parts += [f"{k} acc {v['accuracy']:.4f}" for k, v in metrics.get("test", {}).items()]
    return ", ".join(parts)
