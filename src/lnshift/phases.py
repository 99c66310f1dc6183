"""Methods as sequences of phases: the one table that says what `lp`, `ln`, `lp-ln` and `cyclic` mean.

A phase names the strategy whose tensors train and its share of the epoch budget. The whole budget
(`epochs`, or `steps`) is split evenly over the phases, so methods compare at equal cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

SINGLE_PHASE = {"lp": "head", "ln": "ln", "full": "full", "bitfit": "bitfit", "lora": "lora"}
METHODS = (*SINGLE_PHASE, "lp-ln", "cyclic")


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
    if method == "cyclic":
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
