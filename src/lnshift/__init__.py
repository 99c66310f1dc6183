"""lnshift: tune only the LayerNorms of ViT foundation models, and measure the LayerNorm shift.

    import lnshift

    run = lnshift.fit_run(train="data/train", method="ln", steps=2000, out="runs/ln")
    run.shift()                                     # per-layer LayerNorm shift
    run.rescale("auto", out="runs/ln-auto").report()  # lambda chosen on validation, report.html

docs/api.md walks through it. The names are imported on first use, so `import lnshift` (and with it the
command line) does not load torch. `lnshift.training.fit` is the training module behind `lnshift fit`;
`fit_run` is its entry point for Python.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; `X as X` marks a re-export
    from .api import Run as Run
    from .api import fit_run as fit_run
    from .api import load_run as load_run
    from .config import FitConfig as FitConfig
    from .experiments.demo import run_demo as run_demo
    from .experiments.sweep import run_sweep as run_sweep
    from .experiments.sweep_file import load_sweep as load_sweep
    from .report import write_report as write_report

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "fit_run": "api",
    "FitConfig": "config",
    "load_run": "api",
    "Run": "api",
    "write_report": "report",
    "load_sweep": "experiments.sweep_file",
    "run_sweep": "experiments.sweep",
    "run_demo": "experiments.demo",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
