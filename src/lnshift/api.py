"""The Python face of lnshift: train a run, read it back, and analyse it as the `lnshift` commands do.

Every method calls the library function that the command of the same name calls (pipeline.py, saved_run.py,
report/), so a notebook and the command line write the same files into the same run directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from . import rundir as rd
from .analyses.fsr import FSRReport
from .analyses.saved_run import (
    SavedRun,
    estimate_fsr_of_run,
    evaluate_run,
    fsr_of_run,
    merge_run,
    rescale_run,
    shift_of_run,
)
from .analyses.saved_run import load_run as load_saved
from .analyses.shift import ShiftReport
from .config import FitConfig
from .errors import ConfigError
from .pipeline import fit
from .report import write_report
from .training.heads import Classifier


class Run:
    """A finished run directory; its tuned model is loaded on first use of `model`.

    A `Run` is a path (`os.PathLike`), so it can be given wherever lnshift takes a run directory. The
    analyses load the run afresh from its files, as the commands do, and write their results into it.

    Args:
        path: a run directory written by `fit_run` or `lnshift fit`.
        device: where `model`, `evaluate` and `rescale` run: auto, cpu, cuda or cuda:N.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto") -> None:
        self.path = Path(path)
        self.device = device
        rd.RunDir(self.path).require(rd.CONFIG, rd.BASE, rd.ADAPTER)  # a wrong path fails here, not at first use

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, device={self.device!r})"

    @cached_property
    def saved(self) -> SavedRun:
        """The loaded run: model, config, classes, pretrained and tuned tensors (saved_run.SavedRun)."""
        return load_saved(self.path, self.device)

    @property
    def model(self) -> Classifier:
        """The tuned model in eval mode (backbone + head); output i is `classes[i]`."""
        return self.saved.model

    @property
    def classes(self) -> list[str]:
        """The class names in output order."""
        return self.saved.classes

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics.json as it is now: validation and every test set scored so far."""
        return rd.RunDir(self.path).read_json(rd.METRICS)

    @property
    def lambda_choice(self) -> dict[str, Any] | None:
        """lambda.json: the lambda applied to the shift, how it was chosen, the validation curve; None if none was."""
        run = rd.RunDir(self.path)
        return run.read_json(rd.LAMBDA) if (run / rd.LAMBDA).exists() else None

    def shift(self, write: bool = True) -> ShiftReport:
        """Per-layer LayerNorm shift of the model as saved (`lnshift shift`).

        Args:
            write: also write it to the run's shift.json.
        """
        return shift_of_run(self.path, write)

    def rescale(
        self,
        lam: float | str,
        *,
        target: str = "gamma",
        out: str | os.PathLike | None = None,
        grid: str | None = None,
        score_grid: bool = False,
        progress: bool = True,
    ) -> Run:
        """Rescale the LayerNorm shift by lambda and re-evaluate (`lnshift rescale`); returns the rescaled run.

        Args:
            lam: a number (0: pretrained LayerNorms, 1: as fine-tuned), 'auto' (best on the validation
                split) or 'fsr' (1 / the FSR estimate, after `estimate_fsr`).
            target: the parameters rescaled: gamma, beta or both.
            out: a new run directory to write; None rescales this run in place.
            grid: comma-separated lambdas scored on validation (default: the run's lambda_grid).
            score_grid: with a number or 'fsr', also score the grid (always done for 'auto').
            progress: show progress bars.
        """
        result = rescale_run(
            self.path,
            str(lam),
            target=target,
            out=out,
            grid=grid,
            score_grid=score_grid,
            device=self.device,
            progress=progress,
        )
        if out is not None:
            return Run(result["run"], self.device)
        self.__dict__.pop("saved", None)  # the tensors on disk changed: reload the model on next use
        return self

    def evaluate(self, tests: dict[str, str], progress: bool = True) -> dict[str, Any]:
        """Score the run on named test sets and record them in metrics.json (`lnshift eval`).

        Args:
            tests: test set name -> data spec (DIR, FILE.zip[:INNER], FILE.csv or builtin:...).
            progress: show progress bars.
        """
        return evaluate_run(self.path, tests, device=self.device, progress=progress)

    def fsr(self, reference: str | os.PathLike) -> FSRReport:
        """Oracle FSR against a run on fully representative data, same schedule (`lnshift fsr --reference`).

        Args:
            reference: that run's directory (or `Run`); the result is also written to fsr.json.
        """
        return fsr_of_run(self.path, reference)

    def estimate_fsr(self, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
        """FSR estimated from the run's own training data by nested-subset runs (`lnshift fsr --estimate`).

        Args:
            echo: where the subset runs' progress lines go; None for silence.
        """
        return estimate_fsr_of_run(self.path, echo)

    def merge(self, out: str | os.PathLike) -> Path:
        """Write the tuned model as one plain safetensors state dict (`lnshift merge`); returns its path.

        Args:
            out: the safetensors file to write.
        """
        return merge_run(self.path, out)

    def report(self, out: str | os.PathLike | None = None) -> Path:
        """Write report.html and figures/*.png for the run (`lnshift report`); returns the page's path.

        Args:
            out: the folder to write into; None for the run directory itself.
        """
        return write_report(self.path, out)


def load_run(path: str | os.PathLike, device: str = "auto") -> Run:
    """Read back a finished run directory (from `fit_run`, `lnshift fit` or a sweep) to analyse it.

    Args:
        path: the run directory.
        device: where its model, evaluations and rescaling run: auto, cpu, cuda or cuda:N.
    """
    return Run(path, device)


def fit_run(config: FitConfig | None = None, *, echo: Callable[[str], None] | None = print, **options: Any) -> Run:
    """Train one run and write its run directory, as `lnshift fit` does; returns it, read back.

    Args:
        config: the run's options as a `FitConfig`; or leave it out and give them as `options`.
        echo: where the log lines go (they are also in train.log); None for silence.
        **options: FitConfig fields by name, e.g. `method="ln", steps=300, out="runs/ln"` (`lambda` is
            `lam`); every field is listed in `help(lnshift.FitConfig)` and `lnshift fit --help`.
    """
    if config is not None and options:
        # replace() would keep what the config resolved from its old values (the method's lr, test sets)
        raise ConfigError("give fit_run a FitConfig or options, not both")
    cfg = config if config is not None else FitConfig.from_dict(options, source="fit_run options")
    return Run(fit(cfg, echo).path, cfg.runtime.device)
