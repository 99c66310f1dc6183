"""Reports people would rather look at: one self-contained `report.html` per run or sweep directory.

`write_report(RUN_DIR)` reads only the run directory contract (rundir.py); `write_report(SWEEP_DIR)`
reads a sweep's `results.json` (and `summary.json` when present). Figures are embedded in the page
as base64 PNG and also written as PNG files to `figures/` beside it.
"""

from __future__ import annotations

from pathlib import Path

from .. import rundir as rd
from ..errors import RunDirError
from .html import Figures, page
from .run_report import run_sections
from .sweep_report import sweep_sections

REPORT = "report.html"
FIGURES = "figures"
SWEEP_RESULTS = "results.json"


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write `report.html` (and `figures/*.png`) for a run or sweep directory; returns the page's path.

    Args:
        path: a run directory, or a sweep's output folder (its results.json).
        out: the folder to write into; None for `path` itself.
    """
    path = Path(path)
    folder = Path(out) if out is not None else path
    figs = Figures(folder / FIGURES)
    if (path / SWEEP_RESULTS).is_file():
        title, subtitle, sections = sweep_sections(path, figs)
    elif (path / rd.CONFIG).is_file():
        title, subtitle, sections = run_sections(path, figs)
    else:
        raise RunDirError(f"{path} is neither a run directory (no {rd.CONFIG}) nor a sweep (no {SWEEP_RESULTS})")
    target = folder / REPORT
    rd.write_text(target, page(title, subtitle, sections))
    return target


def report_main(path: str) -> Path:
    """`lnshift report RUN_DIR|SWEEP_DIR`: write the report and say where it is."""
    target = write_report(path)
    print(f"report: {target}")
    return target


__all__ = ["report_main", "write_report"]
