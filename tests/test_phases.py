"""Methods expand into the documented phases, and budgets split exactly."""

import pytest

from lnshift.errors import ConfigError
from lnshift.phases import phases_for, split_budget


def test_single_phase_methods():
    assert [(p.name, p.strategy) for p in phases_for("lp")] == [("lp", "head")]
    assert [(p.name, p.strategy) for p in phases_for("ln")] == [("ln", "ln")]
    assert [p.strategy for p in phases_for("lp-ln")] == ["head", "ln"]


def test_cyclic_alternates_head_and_layernorm():
    phases = phases_for("cyclic", cycles=3, rescale_each_cycle=True)
    assert [p.strategy for p in phases] == ["head", "layernorm"] * 3
    assert [p.rescale_after for p in phases] == [False, True] * 3
    assert len({p.name for p in phases}) == 6


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
