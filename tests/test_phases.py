"""Methods expand into the documented phases, and budgets split exactly."""

import pytest

from lnshift.config import FitConfig
from lnshift.errors import ConfigError
from lnshift.training.phases import (
    BUDGETS,
    DEFAULT_LR,
    LR_GRID,
    METHODS,
    budget_factor,
    budget_rule,
    phase_steps,
    phases_for,
    split_budget,
)


def test_single_phase_methods():
    assert [(p.name, p.strategy) for p in phases_for("lp")] == [("lp", "head")]
    assert [(p.name, p.strategy) for p in phases_for("ln")] == [("ln", "ln")]
    assert [p.strategy for p in phases_for("lp-ln")] == ["head", "ln"]


@pytest.mark.parametrize("method", ["cyclic", "cyclic-kx"])
def test_cyclic_alternates_head_and_layernorm(method):
    phases = phases_for(method, cycles=3, rescale_each_cycle=True)
    assert [p.strategy for p in phases] == ["head", "layernorm"] * 3
    assert [p.rescale_after for p in phases] == [False, True] * 3
    assert len({p.name for p in phases}) == 6


@pytest.mark.parametrize(
    ("method", "cycles", "steps"),
    [
        ("ln", 2, [300]),
        ("lp-ln", 2, [150, 150]),
        ("cyclic", 2, [75] * 4),  # K cycles share the budget: every method trains 300 steps
        ("cyclic", 3, [50] * 6),
        ("cyclic-kx", 2, [300] * 4),  # the paper's budget: 2K x 300 steps
        ("cyclic-kx", 3, [300] * 6),
    ],
)
def test_phase_steps_share_the_budget_except_cyclic_kx(method, cycles, steps):
    assert phase_steps(method, cycles, 300) == steps
    assert sum(steps) == 300 * budget_factor(method, cycles)
    assert budget_rule(method) == BUDGETS.get(method, "the budget split evenly over the method's phases")


def test_fsr_sub_runs_of_cyclic_kx_train_the_runs_steps_per_phase(monkeypatch, tmp_path):
    """estimate_fsr is given the run's total steps; a sub-run's budget must give each phase what the run's had."""
    from lnshift.analyses.fsr_runs import sub_run

    seen = []
    monkeypatch.setattr("lnshift.analyses.fsr_runs.train_run", lambda cfg, device, echo: seen.append(cfg))
    for method in ("cyclic", "cyclic-kx"):
        cfg = FitConfig.from_dict({"method": method, "cycles": 2, "steps": 12})
        total = sum(phase_steps(method, 2, 12))
        sub_run(cfg, tmp_path, 0.5, 0, total, None, "1/1")
        assert phase_steps(method, 2, seen[-1].optim.steps) == phase_steps(method, 2, 12)


def test_every_method_has_a_learning_rate_grid_and_default():
    assert set(LR_GRID) == set(DEFAULT_LR) == set(METHODS)
    assert all(min(LR_GRID[m]) <= DEFAULT_LR[m] <= max(LR_GRID[m]) for m in METHODS)


def test_errors_name_the_option():
    with pytest.raises(ConfigError, match="--method"):
        phases_for("nope")
    with pytest.raises(ConfigError, match="--cycles"):
        phases_for("cyclic", cycles=0)
    with pytest.raises(ConfigError, match="budget"):
        split_budget(1, 2)


@pytest.mark.parametrize("total,n", [(10, 4), (7, 7), (100, 3)])
def test_split_budget_sums_and_is_even(total, n):
    parts = split_budget(total, n)
    assert sum(parts) == total and max(parts) - min(parts) <= 1
