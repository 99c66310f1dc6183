"""The sections of a single run's report, read from its run directory only (see rundir.py).

A missing artifact never fails the report: its section says which file is absent and what makes it
(an `lp` run has no shift, a run without --lambda has no lambda curve), so a report of a half-finished
run is still worth opening.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .. import rundir as rd
from ..config import DataConfig, FitConfig
from ..training.phases import BUDGETS, CYCLIC
from . import figures as F
from .html import Figures, Section, key_values, note, num, pct, table, warning

METRIC_COLUMNS = [  # (key, header, formatter)
    ("accuracy", "accuracy %", pct),
    ("balanced_accuracy", "balanced acc. %", pct),
    ("macro_f1", "macro-F1 %", pct),
    ("ece", "ECE %", pct),
    ("auroc", "AUROC", lambda v: num(v, 4)),
]


def _json(run: rd.RunDir, name: str) -> Any | None:
    path = run / name
    return json.loads(path.read_text()) if path.is_file() else None


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def trainable_counts(run: rd.RunDir) -> dict[str, int] | None:
    """Values per group of the tensors that trained, from the adapter's shapes (no tensor is loaded)."""
    path = run / rd.ADAPTER
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        norms = set(json.loads(meta.get("norms", "[]")))
        counts = {"LayerNorm": 0, "head": 0, "other": 0}
        for name in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
            group = "LayerNorm" if name.rpartition(".")[0] in norms else "head" if name.startswith("head.") else "other"
            counts[group] += math.prod(fh.get_slice(name).get_shape())
    return counts


def event_times(run: rd.RunDir) -> tuple[int, float] | None:
    """(epochs logged, seconds from the first to the last event) from events.jsonl."""
    path = run / rd.EVENTS
    if not path.is_file():
        return None
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not events:
        return None
    times = [e["time"] for e in events]
    return sum(e["event"] == "epoch" for e in events), max(times) - min(times)


def saved_config(run: rd.RunDir, config: dict) -> FitConfig:
    """The run's options from its config.yaml: by section, or flat as runs before the sections wrote them."""
    return FitConfig.from_dict(config.get("fit", {}), str(run / rd.CONFIG))


def regime_text(data: DataConfig) -> str:
    if data.shots is not None:
        return f"{data.shots} shots per class"
    if data.fraction is not None:
        return f"{100 * data.fraction:g}% of the training split (stratified)"
    return "all training data"


def summary_section(run: rd.RunDir, config: dict, splits: dict | None) -> Section:
    cfg, env = saved_config(run, config), config.get("environment", {})
    parts = []
    if not run.done:
        parts.append(warning("This run has no DONE marker: it did not finish, and some sections may be missing."))
    model = cfg.model.name + (f" (weights {cfg.model.weights})" if cfg.model.weights else "")
    if cfg.model.kwargs:
        model += f" {cfg.model.kwargs}"
    rows: list[tuple[str, object]] = [("model", model), ("training data", cfg.data.train)]
    if splits:
        sizes = ", ".join(f"{name} {len(s['indices'])}" for name, s in splits["splits"].items())
        rows += [("classes", f"{len(splits['classes'])}: {', '.join(splits['classes'])}"), ("split sizes", sizes)]
    tests = ", ".join(f"{k} = {v}" for k, v in (cfg.data.test or {}).items())
    rows += [("test sets", tests or "none"), ("regime", regime_text(cfg.data))]
    method = cfg.method.name
    if method in CYCLIC:
        method += f" (K = {cfg.method.cycles}: {BUDGETS[method]})"
    rows.append(("method", f"{method}, {cfg.method.head} head"))
    if cfg.method.lam is not None:
        rows.append(("lambda", f"{cfg.method.lam} on {cfg.method.lambda_target}"))
    optim = cfg.optim
    budget = f"{optim.steps} steps" if optim.steps is not None else f"{optim.epochs} epochs"
    rows.append(("schedule", f"{budget}, batch {optim.batch_size}, lr {optim.lr}, seed {optim.seed}"))
    counts = trainable_counts(run)
    if counts is not None:
        detail = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
        rows.append(("trainable parameters", f"{sum(counts.values()):,} ({detail}) in {rd.ADAPTER}"))
    times = event_times(run)
    if times is not None:
        epochs, span = times
        rows.append(("time", f"{duration(span)} from the first to the last event of {rd.EVENTS} ({epochs} epochs)"))
    if run.done:
        rows.append(("finished", (run / rd.DONE).read_text().strip()))
    rows.append(("environment", ", ".join(f"{k} {env[k]}" for k in ("lnshift", "torch", "timm", "cuda") if env.get(k))))
    resolved = config.get("resolved")  # runs of earlier versions have none
    if resolved:
        fast = ", ".join(resolved["fast_paths"]) or "none"
        rows.append(("runtime", f"input pipeline {resolved['input_pipeline']}, fast paths {fast}"))
    parts.append(key_values(rows))
    return Section("summary", "Run", "".join(parts))


def metrics_section(metrics: dict | None) -> Section:
    if metrics is None:
        return Section("metrics", "Metrics", note(f"No {rd.METRICS}: the run did not reach its final evaluation."))
    splits = [("validation", metrics["val"])] + [(f"test: {k}", v) for k, v in metrics.get("test", {}).items()]
    columns = [c for c in METRIC_COLUMNS if any(c[0] in m for _, m in splits)]
    rows = [[name, num(m.get("n"))] + [fmt(m.get(key)) for key, _, fmt in columns] for name, m in splits]
    body = table(["split", "n"] + [header for _, header, _ in columns], rows, cls="metrics")
    body += note("Scored with the model as saved (after lambda rescaling when a lambda was applied).")
    return Section("metrics", "Metrics", body)


def _shift_tables(layers: list[dict]) -> str:
    rows = [
        [layer["name"], num(layer["gamma_l2"]), num(layer["beta_l2"]), num(layer["gamma_rel"]), num(layer["beta_rel"])]
        for layer in layers
    ]
    return table(["LayerNorm", "‖Δγ‖₂", "‖Δβ‖₂", "‖Δγ‖/‖γ₀‖", "‖Δβ‖/‖β₀‖"], rows)


def shift_section(shift: dict | None, figs: Figures) -> Section:
    if shift is None:
        return Section("shift", "LayerNorm shift", note(f"No {rd.SHIFT}: no LayerNorm trained in this run."))
    layers = shift["layers"]
    parts = [
        key_values(
            [
                ("shift_gamma (Σ‖Δγ‖₂)", num(shift["shift_gamma"], 4)),
                ("shift_beta (Σ‖Δβ‖₂)", num(shift["shift_beta"], 4)),
                ("shift_ln = shift_gamma + shift_beta", num(shift["shift_ln"], 4)),
                ("LayerNorms", len(layers)),
            ]
        ),
        note(f"Measured on {rd.ADAPTER} against {rd.BASE}: after lambda rescaling when one was applied."),
    ]
    grid = F.block_grid(layers)
    if grid is not None:
        caption = f"L2 shift of gamma and beta per block ({len(grid.rows)} blocks x {', '.join(grid.columns)})."
        parts.append(figs.embed("shift_blocks", F.block_heatmap(grid, "‖Δ‖₂"), caption))
        if grid.others:
            parts.append("<h3>LayerNorms outside the blocks</h3>" + _shift_tables(grid.others))
    names = [layer["name"] for layer in layers]
    bars = F.layer_bars(names, [x["gamma_l2"] for x in layers], [x["beta_l2"] for x in layers], "L2 shift")
    parts.append(figs.embed("shift_layers", bars, "L2 shift of every LayerNorm in model order."))
    parts.append(f"<details><summary>All {len(layers)} LayerNorms</summary>{_shift_tables(layers)}</details>")
    return Section("shift", "LayerNorm shift", "".join(parts))


def lambda_section(choice: dict | None, figs: Figures) -> Section:
    if choice is None:
        return Section("lambda", "Lambda", note(f"No {rd.LAMBDA}: the run was not rescaled (fit with --lambda)."))
    how = choice.get("selected_on", "?")
    cost = choice.get("cost", {})
    rows = [
        ("chosen lambda", num(choice["lambda"], 4)),
        ("selected on", how),
        ("target", choice.get("target")),
        ("criterion", choice.get("criterion")),
        (
            "cost of the curve",
            f"{cost.get('seconds', '?')} s, {cost.get('batched_forward_passes', '?')} batched passes"
            if cost
            else "no validation curve scored",
        ),
    ]
    parts = [key_values(rows)]
    if choice.get("curve"):
        short = {"val": "best on validation", "given": "given"}.get(how, "1 / FSR_est" if "FSR" in how else how)
        fig = F.lambda_curve(choice["curve"], choice["lambda"], short)
        parts.append(figs.embed("lambda_curve", fig, "Validation accuracy against lambda; the chosen lambda in red."))
    return Section("lambda", "Lambda", "".join(parts))


def fsr_section(oracle: dict | None, estimate: dict | None, figs: Figures) -> Section:
    if oracle is None and estimate is None:
        text = (
            f"No {rd.FSR} or {rd.FSR_ESTIMATE}: run `lnshift fsr RUN_DIR --reference REF_DIR` (oracle) or "
            "`--estimate`, or fit with --lambda fsr."
        )
        return Section("fsr", "FSR", note(text))
    parts = []
    if oracle is not None:
        rows = [(k, num(oracle[k], 4)) for k in ("fsr_gamma", "fsr_beta", "fsr_ln")]
        rows += [(f"budget: {k}", v) for k, v in oracle.get("budget", {}).items()]
        parts.append("<h3>Oracle FSR (against a reference run)</h3>" + key_values(rows))
        parts += [warning(w) for w in oracle.get("warnings", [])]
        grid = F.block_grid(oracle["layers"], "fsr_gamma", "fsr_beta")
        if grid is not None:
            caption = "Oracle FSR per block: this run's shift over the reference run's."
            parts.append(figs.embed("fsr_blocks", F.block_heatmap(grid, "FSR"), caption))
    if estimate is not None:
        fit = estimate["gamma_fit"]
        rows = [
            ("FSR_est (gamma)", f"{num(estimate['fsr_est'], 4)} ± {num(estimate['fsr_std'], 3)}"),
            ("FSR_est (beta)", num(estimate["fsr_beta_est"], 4)),
            ("lambda = 1 / FSR_est (clipped)", num(estimate["lambda"], 4)),
            ("fit", f"{fit['model']}, RMS residual {num(fit['residual'])}, trend {num(fit['trend'])}"),
            ("runs", f"{len(estimate['points'])} at {estimate.get('steps_per_run', '?')} steps each"),
        ]
        parts.append("<h3>Estimated FSR (nested subsets of the training data)</h3>" + key_values(rows))
        if estimate.get("warning"):
            parts.append(warning(estimate["warning"]))
        caption = "Summed gamma shift against the training-set size, and its extrapolation to n → ∞."
        parts.append(figs.embed("fsr_estimate", F.fsr_fit(estimate["points"], fit), caption))
    return Section("fsr", "FSR", "".join(parts))


def cycles_section(cycles: dict | None, figs: Figures) -> Section:
    if not cycles or not cycles.get("phases"):
        return Section("cycles", "Phases", note(f"No {rd.CYCLES}: the run did not finish a phase."))
    phases = cycles["phases"]
    per_cycle = any("lambda" in ph for ph in phases)  # --lambda-each-cycle: rescaled after each LayerNorm phase
    rows = []
    for ph in phases:
        kept = ph["history"][ph["best_epoch"] - 1] if ph["best_epoch"] >= 1 else {}
        row = [
            ph["phase"],
            ph["strategy"],
            num(ph["steps"]),
            f"{ph['best_epoch']} of {len(ph['history'])}",
            pct(kept.get("val_accuracy")),
            num(ph.get("shift_gamma")),
            num(ph.get("shift_beta")),
        ]
        if per_cycle:
            row += [num(ph.get("lambda")), pct(ph.get("val_after_lambda"))]
        rows.append(row)
    header = ["phase", "trains", "steps", "kept epoch", "val acc. %", "shift γ", "shift β"]
    header += ["λ", "val after λ %"] if per_cycle else []
    caption = (
        "Validation accuracy per epoch across phases (shading: blue head, orange LayerNorm); red stars mark the "
        f"epoch each phase kept{', green diamonds the accuracy after its lambda' if per_cycle else ''}. "
        "Right: summed shift after each phase, before any final lambda."
    )
    budget = cycles.get("budget")  # runs before the budget record have none
    spent = note(f"{budget['steps']} optimiser steps in all: {budget['rule']}.") if budget else ""
    body = spent + table(header, rows, text_columns=2) + figs.embed("cycles", F.cycle_history(phases), caption)
    return Section("cycles", "Phases", body)


def run_sections(path: Path, figs: Figures) -> tuple[str, str, list[Section]]:
    """Title, subtitle and sections of a run's report."""
    run = rd.RunDir(path)
    run.require(rd.CONFIG)
    config = run.read_config()
    cfg = saved_config(run, config)
    sections = [
        summary_section(run, config, _json(run, rd.SPLITS)),
        metrics_section(_json(run, rd.METRICS)),
        shift_section(_json(run, rd.SHIFT), figs),
        lambda_section(_json(run, rd.LAMBDA), figs),
        cycles_section(_json(run, rd.CYCLES), figs),
        fsr_section(_json(run, rd.FSR), _json(run, rd.FSR_ESTIMATE), figs),
    ]
    title = f"lnshift run: {cfg.method.name} on {cfg.model.name}"
    return title, str(path.resolve()), sections
