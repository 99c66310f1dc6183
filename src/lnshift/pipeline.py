"""`lnshift fit` end to end: training (fit.py, or search.py for a grid), then the analyses its options ask for.

Training writes the run directory. With a lambda applied once at the end (`--lambda`, not between
cycles) it leaves the run open, and the analyses over that directory finish it: the FSR estimate for
`--lambda fsr`, then lambda chosen or given and applied in place (saved_run.py). They are the functions
that `lnshift fsr --estimate`, `lnshift rescale` and a sweep's `+fsr` / `+auto` cells call, so there is
one FSR path and one lambda path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import rundir as rd
from .analyses.saved_run import estimate_fsr_of_run, rescale_run
from .config import FitConfig
from .training import distributed as dist
from .training.evaluate import resolve_device
from .training.fit import close_run, summarize, train_run
from .training.search import fit_search


def fit(cfg: FitConfig, echo: Callable[[str], None] | None = print) -> rd.RunDir:
    """Train one run as configured, apply its final lambda, and write its run directory; returns it.

    With a grid (`cfg.optim.search`, or `--lr A,B,C` / `auto`) every candidate trains under OUT/search/ and the
    one with the best validation metric becomes the run (search.py). Under torchrun every process calls
    it, and together they train (and rescale) one data-parallel run (distributed.py). An interrupted run
    resumes with `cfg.runtime.resume`, its final lambda and FSR estimate included.
    """
    with dist.process_group(resolve_device(cfg.runtime.device)) as device:
        run = fit_search(cfg, device, echo) if cfg.optim.search else train_run(cfg, device, echo)
        if cfg.method.final_lambda:
            rescale_trained(run, cfg, device, echo)
        return run


def rescale_trained(run: rd.RunDir, cfg: FitConfig, device: torch.device, echo: Callable[[str], None] | None) -> None:
    """Finish an open trained run with its final lambda: FSR estimate ('fsr'), rescale in place, then DONE.

    The validation grid is scored for any lambda, so lambda.json shows where a given or FSR lambda lies.
    """
    log = rd.EventLog(run, echo)
    if cfg.method.lam == "fsr":
        estimate_fsr_of_run(run.path, echo=log.info)
    choice = rescale_run(
        run.path,
        cfg.method.lam,
        target=cfg.method.lambda_target,
        score_grid=True,
        device=str(device),
        progress=cfg.runtime.progress,
        finish=False,
    )
    log.info(f"lambda {choice['lambda']:g} ({cfg.method.lam}) on {cfg.method.lambda_target}")
    log.info("metrics: " + summarize(choice["metrics"]))
    close_run(run, log)
