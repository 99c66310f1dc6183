"""Methods as sequences of phases: the one table that says what `lp`, `ln`, `lp-ln`, `cyclic`, ... mean.

A phase names the strategy whose tensors train and its share of the epoch budget. The whole budget
(`epochs`, or `steps`) is split evenly over the phases, so methods compare at equal cost; only
`cyclic-kx`, the paper's cyclic budget, gives every phase the whole budget (`phase_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import ConfigError

# the methods; `--method` takes its choices from this type (config.MethodConfig)
Method = Literal["lp", "ln", "full", "bitfit", "lora", "lp-ln", "cyclic", "cyclic-kx"]
METHODS: tuple[str, ...] = get_args(Method)
SINGLE_PHASE = {"lp": "head", "ln": "ln", "full": "full", "bitfit": "bitfit", "lora": "lora"}
CYCLIC = ("cyclic", "cyclic-kx")  # [head], [layernorm], K times; they differ only in the budget
# how the cyclic methods spend the --steps / --epochs budget: the label in help texts, reports and docs
BUDGETS = {
    "cyclic": "K cycles sharing the budget (equal optimiser steps with every other method)",
    "cyclic-kx": "the paper's budget, every phase the full budget (2K times the steps)",
}

# Each method's learning-rate grid for `--lr auto` (chosen on validation, docs/search.md) and the single
# `--lr` used when none is given. Tuning a few thousand gains and biases takes far larger steps than
# tuning every weight, so the grids differ by method. Measured in the protocol with selection
# (benchmarks/results/README.md; 4 datasets x 3 regimes x 3 seeds): LP chose both ends of its
# 3e-3..0.3 grid in 19 of 36 cells (0.3 in 6 of 9 at 100 % data), so its grid now spans 1e-3..1;
# the LayerNorm methods and BitFit never chose 0.3 and often diverged there, so their grid ends at 0.1.
_HEAD_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
_NORM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_GRID = {
    "lp": _HEAD_GRID,
    "ln": _NORM_GRID,
    "bitfit": _NORM_GRID,
    "lp-ln": _NORM_GRID,
    "cyclic": _NORM_GRID,
    "cyclic-kx": _NORM_GRID,
    "full": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "lora": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}
# the value chosen most often in that protocol (ties: the smaller)
DEFAULT_LR = {
    "lp": 3e-1, "ln": 3e-2, "bitfit": 3e-2, "lp-ln": 3e-2, "cyclic": 3e-2, "cyclic-kx": 3e-3, "full": 3e-4,
    "lora": 1e-2,
}  # fmt: skip


@dataclass(frozen=True)
class Phase:
    name: str  # unique within a run, e.g. "head-1", "layernorm-1"
    strategy: str
    rescale_after: bool = False  # apply lambda rescaling to the LayerNorms when this phase ends


def phases_for(method: str, cycles: int = 2, rescale_each_cycle: bool = False) -> list[Phase]:
    """Expand a method name into its phases."""
    if method in SINGLE_PHASE:
        return [Phase(method, SINGLE_PHASE[method])]
    if method == "lp-ln":
        return [Phase("lp", "head"), Phase("ln", "ln")]
    if method in CYCLIC:
        if cycles < 1:
            raise ConfigError(f"--cycles must be >= 1, got {cycles}")
        phases = []
        for k in range(1, cycles + 1):
            phases.append(Phase(f"head-{k}", "head"))
            phases.append(Phase(f"layernorm-{k}", "layernorm", rescale_after=rescale_each_cycle))
        return phases
    raise ConfigError(f"unknown --method {method!r}; choose one of {list(METHODS)}")


def split_budget(total: int, n_phases: int) -> list[int]:
    """Split an integer budget over phases as evenly as possible (earlier phases get the remainder)."""
    if total < n_phases:
        raise ConfigError(f"a budget of {total} cannot be split over {n_phases} phases; raise --epochs or --steps")
    base, extra = divmod(total, n_phases)
    return [base + (1 if i < extra else 0) for i in range(n_phases)]


def budget_factor(method: str, cycles: int = 2) -> int:
    """How many times the --steps / --epochs budget a method trains: 2K for cyclic-kx, 1 for every other."""
    return len(phases_for(method, cycles)) if method == "cyclic-kx" else 1


def phase_steps(method: str, cycles: int, budget: int) -> list[int]:
    """Each phase's optimiser steps for a budget of `budget` steps: an even share of it, or all of it (cyclic-kx)."""
    return split_budget(budget * budget_factor(method, cycles), len(phases_for(method, cycles)))


def budget_rule(method: str) -> str:
    """How a method spends the budget, in words (recorded in cycles.json)."""
    return BUDGETS.get(method, "the budget split evenly over the method's phases")
