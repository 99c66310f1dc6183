"""`lnshift demo`: the method end to end, offline, on a CPU, in a few minutes.

The bundled CIFAR-10 ViT is tuned on 8 photos per class of the built-in PACS subset with LP, LN and
cyclic training, each at the learning rate chosen on validation from a small grid (the recommended
recipe, docs/search.md; a method's candidates train in one batched pass); the LN and cyclic shifts are
then rescaled by lambda, chosen on validation ('auto') or from the FSR estimated on the training data
('fsr'). Every run is scored on held-out photos (in
distribution) and on cartoons and sketches (out of distribution). All methods get the same step budget,
so their shifts and the FSR estimate compare. Finished run directories are reused and interrupted ones
resumed, so a second call only prints the table again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import rundir as rd
from ..analyses.saved_run import estimate_fsr_of_run, rescale_run
from ..config import BUILTIN_DATA, FitConfig, environment
from ..errors import ConfigError
from ..pipeline import fit
from ..training.fit import changed_options
from ..training.multirun import fit_batched
from ..training.search import pending_candidates

ID_TEST = "photo"
OOD_TESTS = ("cartoon", "sketch")
RESULT = "demo.json"
SWEEP_RESULTS = "results.json"  # the rows as a sweep's results.json, so `lnshift report DEMO_DIR` reads them
LAMBDA_ON = {"auto": "val", "fsr": "fsr"}  # what each lambda rule looks at, for the table

# Chosen by trying them on a 2-core CPU: at 60 steps of 16 images and lr 1e-2, LN fits the 56 training photos
# (training loss 0.28; lr 3e-3 leaves 0.80); the learning rate is then chosen on validation from the three
# values around the methods' protocol defaults. Two FSR subsets of one seed each keep the estimate to two
# extra runs (the library's default is six).
GRID = {"lr": [0.01, 0.03, 0.1]}
FULL = {
    "shots": 8,
    "steps": 60,
    "batch_size": 16,
    "search": GRID,
    "fsr_subsets": "0.25,0.5",
    "fsr_seeds": 1,
}
# Seconds, for tests: a tiny random ViT, a few steps, a short lambda grid.
FAST = {
    "model": "lnshift/test-vit",
    "model_kwargs": {"img_size": 32, "patch_size": 8},
    "shots": 4,
    "steps": 8,  # cyclic: two steps in each of its four phases
    "batch_size": 8,
    "min_epoch_steps": 1,
    "search": {"lr": [0.01, 0.1]},
    "fsr_subsets": "0.25,0.5",
    "fsr_seeds": 1,
    "lambda_grid": "0,0.5,1,2",
}


@dataclass(frozen=True)
class Variant:
    """One table row: a trained run (`lam` None) or a lambda-rescaled copy of the run of `method`."""

    name: str
    method: str
    lam: str | None = None

    @property
    def dirname(self) -> str:
        return self.method if self.lam is None else f"{self.method}-lambda-{self.lam}"


VARIANTS = (
    Variant("lp", "lp"),
    Variant("ln", "ln"),
    Variant("ln+auto", "ln", "auto"),
    Variant("ln+fsr", "ln", "fsr"),
    Variant("cyclic", "cyclic"),
    Variant("cyclic+auto", "cyclic", "auto"),
)


def demo_config(root: Path, method: str, *, fast: bool, seed: int) -> FitConfig:
    """The fit of one method: photos to train and validate on; held-out photos, cartoons and sketches to test."""
    tests = {ID_TEST: f"{BUILTIN_DATA}/photo-test", **{name: f"{BUILTIN_DATA}/{name}" for name in OOD_TESTS}}
    return FitConfig.from_dict(
        {
            "train": f"{BUILTIN_DATA}/photo",
            "test": tests,
            "method": method,
            "seed": seed,
            "select": "last",  # every run keeps exactly `steps` steps, so shifts and the FSR estimate compare
            "device": "cpu",
            "input_pipeline": "device",  # decoded images as tensors in memory: a method's candidates train in one pass
            "workers": 0,  # decoded images are cached: worker processes would only compete for the cores
            "progress": not fast,
            "out": str(root / method),
            **(FAST if fast else FULL),
        },
        source="demo",
    )


def train(cfg: FitConfig) -> bool:
    """Fit unless a finished run with the same options exists; an interrupted one is resumed. True if it ran."""
    run = rd.RunDir(cfg.runtime.out)
    started = run.path.is_dir() and any(run.path.iterdir())
    if started and (run / rd.CONFIG).exists():
        differ = changed_options(run, cfg)
        if differ:
            raise ConfigError(f"{run.path} holds a run with other options {differ}; choose another --out")
    if run.done:
        return False
    fit(cfg.replace(resume=started), echo=None)
    return True


def train_candidates(cfg: FitConfig, say: Callable[[str], None]) -> bool:
    """The unfinished learning-rate candidates of a method, in one batched pass. True if any trained."""
    todo = pending_candidates(cfg)
    if not todo:
        return False
    say(f"  {len(todo)} learning rates ({', '.join(f'{c.optim.lr:g}' for c in todo)}) in one batched pass")
    fit_batched(todo, torch.device("cpu"), score_tests=False)
    return True


def rescaled(source: Path, lam: str, dest: Path, say: Callable[[str], None], progress: bool) -> bool:
    """Rescale `source` into `dest` unless `dest` is finished and newer than `source`. True if it ran."""
    if rd.RunDir(dest).done and (dest / rd.DONE).stat().st_mtime >= (source / rd.DONE).stat().st_mtime:
        return False
    if dest.exists():  # unfinished, or made from an older source run: cheap to redo
        shutil.rmtree(dest)
    if lam == "fsr" and not (source / rd.FSR_ESTIMATE).exists():
        estimate_fsr_of_run(source, echo=lambda line: say(f"  {line}"))
    rescale_run(source, lam, out=dest, device="cpu", progress=progress)
    return True


def trainable_parameters(run: rd.RunDir) -> int:
    """Values that trained: adapter.safetensors holds exactly those tensors."""
    tensors, _ = run.read_tensors(rd.ADAPTER)
    return sum(t.numel() for t in tensors.values())


def describe(variant: Variant, path: Path) -> dict[str, Any]:
    """One row of the table, read back from the run directories alone."""
    run = rd.RunDir(path)
    metrics = run.read_json(rd.METRICS)
    test = {name: m["accuracy"] for name, m in metrics["test"].items()}
    source = rd.RunDir(path.parent / variant.method)
    fsr = source.read_json(rd.FSR_ESTIMATE) if (source / rd.FSR_ESTIMATE).exists() else {}
    return {
        "method": variant.name,
        "trained_method": variant.method,
        "lambda": run.read_json(rd.LAMBDA)["lambda"] if variant.lam else None,
        "lambda_rule": variant.lam,
        "lr": FitConfig.from_dict(source.read_config()["fit"]).optim.lr,
        "fsr_est": fsr.get("fsr_est"),
        "fsr_std": fsr.get("fsr_std"),
        "fsr_warning": fsr.get("warning"),
        "trainable_parameters": trainable_parameters(run),
        "shift_gamma": run.read_json(rd.SHIFT)["shift_gamma"] if (run / rd.SHIFT).exists() else None,
        "val": metrics["val"]["accuracy"],
        "id": test[ID_TEST],
        "ood": sum(test[name] for name in OOD_TESTS) / len(OOD_TESTS),
        "test": test,
        "n": {
            "train": len(run.read_json(rd.SPLITS)["splits"]["train"]["indices"]),
            "val": metrics["val"]["n"],
            **{name: m["n"] for name, m in metrics["test"].items()},
        },
        "run": str(path),
    }


def run_demo(
    out: str | Path = "runs/demo", *, fast: bool = False, seed: int = 0, echo: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Train, rescale and score every variant into `out` (reusing finished runs); write and return demo.json.

    Args:
        out: the folder for the demo's run directories (finished runs in it are reused).
        fast: a seconds-long smoke version on a random tiny model, instead of minutes on the bundled one.
        seed: the seed of every run.
        echo: where progress lines and the table go; None for silence.
    """
    say = echo or (lambda _: None)
    root = Path(out)
    start = time.time()
    configs = {v.method: demo_config(root, v.method, fast=fast, seed=seed) for v in VARIANTS if v.lam is None}
    for i, variant in enumerate(VARIANTS, 1):
        tick = time.time()
        if variant.lam is None:
            cfg = configs[variant.method]
            say(f"[{i}/{len(VARIANTS)}] {variant.name}: {cfg.optim.steps} steps on {cfg.data.shots} photos per class")
            ran = train_candidates(cfg, say)
            ran = train(cfg) or ran
        else:
            say(f"[{i}/{len(VARIANTS)}] {variant.name}: lambda '{variant.lam}' on the {variant.method} run")
            ran = rescaled(root / variant.method, variant.lam, root / variant.dirname, say, progress=not fast)
        say(f"  {time.time() - tick:.0f} s" if ran else "  reused (finished before)")
    rows = [describe(v, root / v.dirname) for v in VARIANTS]  # after all runs: every ln row shows the FSR estimate
    result = {
        "rows": rows,
        "config": {
            "fast": fast,
            "seed": seed,
            "id_test": ID_TEST,
            "ood_tests": list(OOD_TESTS),
            "settings": FAST if fast else FULL,
            "fit": {method: cfg.to_dict() for method, cfg in configs.items()},
        },
        "seconds": round(time.time() - start, 1),
        "environment": environment(),
    }
    rd.write_json(root / RESULT, result)
    rd.write_json(root / SWEEP_RESULTS, as_sweep(result))
    say(demo_table(result))
    say(f"run directories: {root}/<method>/ (metrics, shift, lambda and FSR files); all rows: {root / RESULT}")
    return result


def as_sweep(result: dict[str, Any]) -> dict[str, Any]:
    """The demo as a sweep of one dataset, regime and seed: results.json in docs/sweep.md's row format."""
    shots, seed = result["config"]["settings"]["shots"], result["config"]["seed"]
    rows = [
        {
            "id": row["method"],
            "dataset": "pacs-mini-photo",
            "method": row["method"],
            "regime": f"shots{shots}",
            "fraction": None,
            "shots": shots,
            "seed": seed,
            "run": row["run"],
            "lambda": row["lambda"],
            "fsr_oracle": None,
            "fsr_est": row["fsr_est"],
            "val.accuracy": row["val"],
            **{f"test.{name}.accuracy": accuracy for name, accuracy in row["test"].items()},
        }
        for row in result["rows"]
    ]
    done = {"cells": len(rows), "done": len(rows), "missing": []}
    return {"sweep_file": "lnshift demo", "environment": result["environment"], **done, "rows": rows}


def demo_table(result: dict[str, Any]) -> str:
    """A caption saying what was run, then the rows as a fixed-width table (accuracies in %)."""
    config, rows = result["config"], result["rows"]
    ln, n = FitConfig.from_dict(config["fit"]["ln"]), rows[0]["n"]
    id_test, ood = config["id_test"], config["ood_tests"]
    caption = [
        f"{ln.model.name}: {ln.optim.steps} steps of {ln.optim.batch_size} images for every method on "
        f"{n['train']} training photos ({ln.data.shots} per class); {n['val']} held-out photos validate.",
        f"Accuracy in %: ID = {id_test} ({n[id_test]} images), OOD = "
        + ", ".join(f"{name} ({n[name]})" for name in ood)
        + "; shift = summed LayerNorm gamma shift of the saved model;",
        "FSR est = shift / its extrapolation to unlimited data; lambda: 1 / FSR est (fsr) or best on validation (val);",
        "lr: chosen on validation from " + ", ".join(f"{v:g}" for v in ln.optim.search["lr"]) + ".",
    ]
    lines = [["method", "lr", "lambda", "FSR est", "trainable", "shift", "val", f"ID:{id_test}", "OOD mean", *ood]]
    for row in rows:
        lam = "-" if row["lambda"] is None else f"{row['lambda']:.2f} ({LAMBDA_ON[row['lambda_rule']]})"
        fsr = "-" if row["fsr_est"] is None else f"{row['fsr_est']:.2f}±{row['fsr_std']:.2f}"
        shift = "-" if row["shift_gamma"] is None else f"{row['shift_gamma']:.2f}"
        accuracies = [row["val"], row["id"], row["ood"], *(row["test"][name] for name in ood)]
        cells = [row["method"], f"{row['lr']:g}", lam, fsr, f"{row['trainable_parameters']:,}", shift]
        lines.append(cells + [f"{100 * a:.1f}" for a in accuracies])
    widths = [max(map(len, column)) for column in zip(*lines, strict=True)]
    table = (
        "  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True))])
        for line in lines
    )
    return "\n".join([*caption, *table])
