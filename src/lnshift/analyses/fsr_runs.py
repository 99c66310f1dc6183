"""FSR estimated from the training data alone: tune nested subsets at the same budget, extrapolate.

The paper's FSR needs fully representative target data T*, which a user never has. We tune the same
method on nested fractions of the training split (several seeds), with the *same number of optimiser
steps* as the full run, measure the LayerNorm shift of each, fit how the shift changes with the
number of samples n (`fsr.extrapolate_shift`) and extrapolate to n -> infinity. FSR_est is the shift at
the full training set divided by that limit, and lambda = 1 / FSR_est (clipped).

Assumptions: the shift converges as n grows at a fixed budget (more data, a less noisy target);
the subsets are samples of the same distribution as the training set (so a training set that misses
part of the target domain cannot be detected: FSR_est measures finite-sample under/over-shift, not
coverage). Sub-runs live under RUN_DIR/fsr-estimate/ and are reused when the estimate is run again.
In a data-parallel run every process calls the estimator and each sub-run is data-parallel too; what
is read back from the sub-runs' directories is read by rank 0 and sent to the others.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .. import rundir as rd
from ..config import FitConfig
from ..errors import ConfigError
from ..training import distributed as dist
from ..training.evaluate import resolve_device
from ..training.fit import train_run
from ..training.phases import budget_factor
from .fsr import extrapolate_shift

SUBDIR = "fsr-estimate"


def parse_fractions(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError as e:
        raise ConfigError(f"--fsr-subsets must be comma-separated fractions, got {text!r}") from e
    bad = [v for v in values if not 0 < v < 1]
    if bad or len(values) < 2:
        raise ConfigError(f"--fsr-subsets needs at least two fractions in (0, 1), got {text!r}")
    return values


def sub_run(
    cfg: FitConfig, root: Path, fraction: float, seed: int, steps: int, echo: Callable | None, count: str
) -> rd.RunDir:
    """One nested-subset run on the parent's schedule; finished ones are reused, interrupted ones resumed.

    `count` ("k/N") says which of the estimate's runs this is; the run shows the parent's progress bars.
    """
    out = root / SUBDIR / f"subset{fraction:g}-seed{seed}"
    run = rd.RunDir(out)
    done, started = dist.from_main(lambda: (run.done, out.exists()))
    what = f"FSR estimate {count}: {fraction:g} of the training split (seed {seed})"
    if done:
        if echo:
            echo(f"{what}: finished before, reused")
        return run
    sub = cfg.replace(
        lam=None,
        lambda_each_cycle=False,
        search={},  # the parent's chosen values, not its grid
        select="last",  # exactly the parent's budget: no earlier epoch kept (docs/fsr.md)
        subset=fraction,
        subset_seed=seed,
        steps=steps // budget_factor(cfg.method.name, cfg.method.cycles),  # each phase the parent's steps
        test={},
        out=str(out),
        resume=started,
        overwrite=False,
    )
    if echo:
        echo(f"{what}: tuning, {sub.optim.steps} steps")
    with dist.process_group(resolve_device(sub.runtime.device)) as device:  # under torchrun, the parent's group
        return train_run(sub, device, None)


def estimate_fsr(
    cfg: FitConfig, root: Path, n_train: int, full_shift: dict[str, Any], steps: int, echo: Callable | None = None
) -> dict[str, Any]:
    """FSR_est for the gamma and beta shifts of a run with `n_train` samples and shift `full_shift`."""
    points = [{"fraction": 1.0, "seed": None, "n": n_train, **_shift_sums(full_shift)}]
    todo = [
        (fraction, seed) for fraction in parse_fractions(cfg.method.fsr_subsets) for seed in range(cfg.method.fsr_seeds)
    ]
    for k, (fraction, seed) in enumerate(todo, 1):
        run = sub_run(cfg, root, fraction, seed, steps, echo, f"{k}/{len(todo)}")
        points.append({"fraction": fraction, "seed": seed, **dist.from_main(partial(_point, run))})
    ns = [p["n"] for p in points]
    gamma = extrapolate_shift(ns, [p["shift_gamma"] for p in points])
    beta = extrapolate_shift(ns, [p["shift_beta"] for p in points])
    usable = gamma["lambda_est"] == gamma["lambda_est"]  # not nan
    return {
        "fsr_est": gamma["fsr_est"],
        "fsr_std": gamma["fsr_std"],
        "lambda": gamma["lambda_est"] if usable else 1.0,
        "warning": None if usable else "the shift could not be extrapolated; lambda left at 1",
        "fsr_beta_est": beta["fsr_est"],
        "gamma_fit": gamma,
        "beta_fit": beta,
        "points": points,
        "steps_per_run": steps,
        "method": "nested subsets at a fixed step budget, shift extrapolated to n -> infinity (docs/fsr.md)",
    }


def _point(run: rd.RunDir) -> dict[str, float]:
    """Training-set size and shift totals of a finished sub-run."""
    n = len(run.read_json(rd.SPLITS)["splits"]["train"]["indices"])
    return {"n": n, **_shift_sums(run.read_json(rd.SHIFT))}


def _shift_sums(shift: dict[str, Any]) -> dict[str, float]:
    return {k: shift[k] for k in ("shift_gamma", "shift_beta", "shift_ln")}
