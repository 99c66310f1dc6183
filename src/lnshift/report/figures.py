"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state, thread-safe).

Every function takes plain numbers read from a run or sweep directory and returns a Figure; the HTML
page and the paper-ready PNG files are both written from that one Figure, so they never disagree.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

DPI = 150
WIDTH = 8.0  # inches: 1200 px at DPI, shown at 800 CSS px so it stays sharp on high-density screens
STRATEGY_COLOURS = {"head": "#dbe9f6", "ln": "#fde2c8", "layernorm": "#fde2c8"}  # phase backgrounds
GAMMA, BETA = "#1f77b4", "#ff7f0e"
# `<stack>.<N>.<norm>`: N is the last all-digit component, and every component after it has a letter
BLOCK_NORM = re.compile(r"^(?P<stack>(?:.*\.)?)(?P<index>\d+)\.(?P<norm>[^.]*[^\d.][^.]*(?:\.[^.]*[^\d.][^.]*)*)$")

FONT = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8}


P = ParamSpec("P")


def styled(draw: Callable[P, Figure]) -> Callable[P, Figure]:
    """Draw with the report's fonts without changing the caller's matplotlib settings (e.g. in a notebook)."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with matplotlib.rc_context(FONT):
            return draw(*args, **kwargs)

    return wrapper


def new_figure(height: float, width: float = WIDTH) -> Figure:
    """A Figure on its own Agg canvas: no pyplot, so nothing global is created or kept alive."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG at DPI; the size in pixels is figsize x DPI exactly (no tight cropping)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


@dataclass
class BlockGrid:
    """Per-norm values arranged as transformer blocks (rows) x norms within a block (columns)."""

    rows: list[str]
    columns: list[str]
    gamma: np.ndarray
    beta: np.ndarray
    others: list[dict] = field(default_factory=list)  # layers outside any numbered block, e.g. the final norm


def block_grid(layers: Sequence[dict], gamma_key: str = "gamma_l2", beta_key: str = "beta_l2") -> BlockGrid | None:
    """Group `...blocks.N.norm1`-style names (timm `blocks.N.norm1`, HF `layer.N.layernorm_before`,
    open_clip `resblocks.N.ln_1`) by block; None when no name has a block number."""
    cells: dict[tuple[str, int], dict[str, dict]] = {}
    columns: list[str] = []
    others = []
    for layer in layers:
        match = BLOCK_NORM.match(layer["name"])
        if match is None:
            others.append(layer)
            continue
        key = (match["stack"], int(match["index"]))
        cells.setdefault(key, {})[match["norm"]] = layer
        if match["norm"] not in columns:
            columns.append(match["norm"])
    if not cells:
        return None
    keys = sorted(cells)
    stacks = {stack for stack, _ in keys}
    rows = [str(i) if len(stacks) == 1 else f"{stack.rstrip('.')} {i}" for stack, i in keys]
    gamma = np.full((len(keys), len(columns)), np.nan)
    beta = np.full_like(gamma, np.nan)
    for r, key in enumerate(keys):
        for c, col in enumerate(columns):
            if col in cells[key]:
                gamma[r, c] = cells[key][col][gamma_key]
                beta[r, c] = cells[key][col][beta_key]
    return BlockGrid(rows, columns, gamma, beta, others)


@styled
def block_heatmap(grid: BlockGrid, quantity: str) -> Figure:
    """Two heat maps, gamma and beta, over blocks x norms; cells are annotated while they stay legible."""
    n_rows, n_cols = grid.gamma.shape
    height = min(2.0 + 0.28 * n_rows, 9.0)
    fig = new_figure(height)
    axes = fig.subplots(1, 2)
    annotate = n_rows * n_cols <= 80
    for ax, values, label in ((axes[0], grid.gamma, "gamma"), (axes[1], grid.beta, "beta")):
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        tilt = n_cols > 3
        ax.set_xticks(range(n_cols), grid.columns, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.set_yticks(range(n_rows), grid.rows)
        ax.set_ylabel("block")
        ax.set_title(f"{quantity}: {label}")
        fig.colorbar(image, ax=ax, shrink=0.9)
        if annotate:
            finite = values[np.isfinite(values)]
            middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
            for (r, c), v in np.ndenumerate(values):
                if math.isfinite(v):
                    colour = "black" if v > middle else "white"
                    ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=7, color=colour)
    return fig


@styled
def layer_bars(names: Sequence[str], gamma: Sequence[float], beta: Sequence[float], ylabel: str) -> Figure:
    """Gamma and beta side by side for every norm in model order, the final and other norms included."""
    fig = new_figure(3.4)
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, gamma, width=0.4, label="gamma", color=GAMMA)
    ax.bar(x + 0.2, beta, width=0.4, label="beta", color=BETA)
    ax.set_xticks(x, short_names(names), rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def short_names(names: Sequence[str]) -> list[str]:
    """Names without the prefix they all share, so tick labels say what differs."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


@styled
def lambda_curve(curve: Sequence[dict], chosen: float, how: str) -> Figure:
    """Validation accuracy (and balanced accuracy) against lambda, with the chosen lambda and lambda = 1 marked."""
    fig = new_figure(3.2)
    ax = fig.subplots()
    lams = [p["lambda"] for p in curve]
    acc = [100 * p["accuracy"] for p in curve]
    ax.plot(lams, acc, "o-", color=GAMMA, label="validation accuracy")
    if all("balanced_accuracy" in p for p in curve):
        bal = [100 * p["balanced_accuracy"] for p in curve]
        ax.plot(lams, bal, "s--", color="#7f7f7f", markersize=3, linewidth=1, label="balanced accuracy")
    ax.axvline(1.0, color="#7f7f7f", linestyle=":", linewidth=1, label="lambda = 1 (as fine-tuned)")
    ax.axvline(chosen, color="#d62728", linewidth=1.2, label=f"chosen lambda = {chosen:.4g} ({how})")
    on_grid = [a for lam, a in zip(lams, acc, strict=True) if lam == chosen]
    if on_grid:
        ax.plot([chosen], on_grid[:1], "*", color="#d62728", markersize=14, zorder=5)
    ax.set_xlabel("lambda (0 = pretrained LayerNorms, 1 = fine-tuned)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


@styled
def fsr_fit(points: Sequence[dict], fit: dict) -> Figure:
    """Measured gamma shift against training-set size, the fitted curve and its limit shift_inf."""
    fig = new_figure(3.2)
    ax = fig.subplots()
    n = np.array([p["n"] for p in points], dtype=float)
    ax.plot(n, [p["shift_gamma"] for p in points], "o", color=GAMMA, label="runs on nested subsets")
    params, n_ref = fit["params"], fit["n_ref"]
    p = {"inv_sqrt": 0.5, "inv": 1.0}.get(fit["model"], params.get("p", 1.0))
    grid = np.linspace(n.min() * 0.8, n_ref * 4, 200)
    ax.plot(
        grid,
        params["shift_inf"] + params["a"] * (grid / n_ref) ** -p,
        color=GAMMA,
        alpha=0.7,
        label=f"fit ({fit['model']})",
    )
    s_inf, s_std = fit["shift_inf"], fit["shift_inf_std"]
    ax.axhline(s_inf, color="#d62728", linestyle="--", linewidth=1, label=f"shift_inf = {s_inf:.3g}")
    if math.isfinite(s_std):
        ax.axhspan(s_inf - s_std, s_inf + s_std, color="#d62728", alpha=0.1)
    ax.axvline(n_ref, color="#7f7f7f", linestyle=":", linewidth=1, label="the run's training set")
    ax.set_xlabel("training samples n")
    ax.set_ylabel("summed gamma shift")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


@styled
def cycle_history(phases: Sequence[dict]) -> Figure:
    """Validation accuracy per epoch across phases (kept epochs starred), and the shift after each phase."""
    has_shift = any("shift_gamma" in ph for ph in phases)
    fig = new_figure(3.4)
    axes = fig.subplots(1, 2, width_ratios=[2, 1]) if has_shift else [fig.subplots()]
    ax = axes[0]
    start = 0
    for ph in phases:
        epochs = [start + h["epoch"] for h in ph["history"]]
        acc = [100 * h["val_accuracy"] for h in ph["history"]]
        end = start + len(ph["history"])
        ax.axvspan(start + 0.5, end + 0.5, color=STRATEGY_COLOURS.get(ph["strategy"], "#eeeeee"), zorder=0)
        ax.plot(epochs, acc, "o-", color="#333333", markersize=3, linewidth=1)
        if ph["best_epoch"] >= 1:
            kept = ph["history"][ph["best_epoch"] - 1]
            ax.plot([start + ph["best_epoch"]], [100 * kept["val_accuracy"]], "*", color="#d62728", markersize=11)
        if "val_after_lambda" in ph:
            ax.plot([end + 0.5], [100 * ph["val_after_lambda"]], "D", color="#2ca02c", markersize=5)
        ax.text(
            (start + end) / 2 + 0.5,
            1.0,
            ph["phase"],
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=7,
        )
        start = end
    ax.set_xlim(0.5, start + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (all phases)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    if has_shift:
        bars = axes[1]
        x = np.arange(len(phases))
        bars.bar(x - 0.2, [ph.get("shift_gamma", np.nan) for ph in phases], width=0.4, color=GAMMA, label="gamma")
        bars.bar(x + 0.2, [ph.get("shift_beta", np.nan) for ph in phases], width=0.4, color=BETA, label="beta")
        bars.set_xticks(x, [ph["phase"] for ph in phases], rotation=45, ha="right")
        bars.set_ylabel("summed L2 shift after the phase")
        bars.legend()
        bars.grid(axis="y", alpha=0.3)
    return fig


@dataclass
class Series:
    """One line of a sweep panel: a method's mean and 95% interval at each regime value."""

    label: str
    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


@styled
def regime_panels(
    panels: Sequence[Sequence[tuple[str, str, list[Series]]]], order: Sequence[str], xlabel: str, log_x: bool
) -> Figure:
    """A grid of panels (rows of (title, ylabel, series)); a series' colour is its label's place in `order`,
    so a method has one colour in every panel and every figure of a report.

    Points are dodged a little along x so that the intervals of methods at the same regime stay apart.
    """
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    fig = new_figure(0.6 + 2.6 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    handles: dict[str, object] = {}
    for r, row in enumerate(panels):
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            title, ylabel, series = row[c]
            ticks = sorted({v for s in series for v in s.x})
            span = ticks[-1] - ticks[0]  # 0 for a single regime: nothing to dodge from
            for s in series:
                k = order.index(s.label)
                offset = (k - (len(order) - 1) / 2) * 0.012 * (span > 0)
                x = np.array(s.x) * 10**offset if log_x else np.array(s.x) + offset * span
                mean = np.array(s.mean)
                err = np.nan_to_num([mean - np.array(s.low), np.array(s.high) - mean])
                handles[s.label] = ax.errorbar(
                    x, mean, yerr=err, fmt="o-", markersize=3, capsize=2, linewidth=1, color=f"C{k % 10}"
                )
            if log_x:
                ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
    labels = [label for label in order if label in handles]
    fig.legend([handles[label] for label in labels], labels, loc="outside lower center", ncols=min(len(labels), 6))
    return fig
