"""Oracle FSR on constructed reports, lambda clipping, and the shift extrapolation."""

import math

import numpy as np
import pytest

from lnshift.analyses.fsr import extrapolate_shift, lambda_from_fsr, oracle_fsr
from lnshift.analyses.shift import LayerShift, ShiftReport
from lnshift.errors import ConfigError


def _report(gammas: list[float], betas: list[float], names: tuple[str, ...] = ("a", "b")) -> ShiftReport:
    layers = [LayerShift(name, g, b, 0.0, 0.0) for name, g, b in zip(names, gammas, betas, strict=True)]
    return ShiftReport(layers, sum(gammas), sum(betas), sum(gammas) + sum(betas))


def test_oracle_fsr_known_ratios() -> None:
    run = _report([1.0, 3.0], [2.0, 0.0])
    reference = _report([2.0, 2.0], [4.0, 0.0])
    report = oracle_fsr(run, reference, {"run_steps": 100, "reference_steps": 100})
    assert report.layers[0] == {"name": "a", "fsr_gamma": 0.5, "fsr_beta": 0.5}
    assert report.layers[1]["fsr_gamma"] == 1.5
    assert math.isnan(report.layers[1]["fsr_beta"])  # reference beta did not move
    assert (report.fsr_gamma, report.fsr_beta, report.fsr_ln) == (1.0, 0.5, 0.75)
    assert report.warnings == []
    assert report.to_dict()["budget"] == {"run_steps": 100, "reference_steps": 100}
    table = report.table()
    assert "a" in table and "b" in table and "0.75" in table


def test_layers_are_matched_by_name() -> None:
    run = _report([3.0, 3.0], [0.0, 0.0], names=("b", "a"))
    reference = _report([2.0, 6.0], [0.0, 0.0], names=("a", "b"))
    assert [layer["fsr_gamma"] for layer in oracle_fsr(run, reference).layers] == [0.5, 1.5]


def test_mismatched_layers_are_named() -> None:
    with pytest.raises(ConfigError, match=r"'c'.*'b'"):
        oracle_fsr(_report([1.0, 1.0], [0.0, 0.0], names=("a", "c")), _report([1.0, 1.0], [0.0, 0.0]))


def test_budget_mismatch_warns() -> None:
    budget = {"run_steps": 500, "reference_steps": 2000, "run_lr": 1e-3, "reference_lr": 1e-3}
    report = oracle_fsr(_report([1.0, 1.0], [1.0, 1.0]), _report([1.0, 1.0], [1.0, 1.0]), budget)
    assert len(report.warnings) == 1 and "run_steps=500" in report.warnings[0]
    assert "warning" in report.table()


@pytest.mark.parametrize(("fsr", "lam"), [(0.5, 2.0), (2.0, 0.5), (0.01, 4.0), (100.0, 0.25)])
def test_lambda_from_fsr_clips(fsr: float, lam: float) -> None:
    assert lambda_from_fsr(fsr) == lam


@pytest.mark.parametrize("fsr", [0.0, -1.0, math.nan, math.inf])
def test_lambda_from_fsr_rejects(fsr: float) -> None:
    with pytest.raises(ConfigError, match="FSR"):
        lambda_from_fsr(fsr)
    with pytest.raises(ConfigError, match="bounds"):
        lambda_from_fsr(1.0, lo=2.0, hi=1.0)


N = [8, 16, 32, 64, 128, 256] * 3


@pytest.mark.parametrize(
    ("curve", "model", "shift_inf"),
    [
        (lambda n: 2.0 - 3.0 / np.sqrt(n), "inv_sqrt", 2.0),  # under-represented: rises with n
        (lambda n: 2.0 + 5.0 / n, "inv", 2.0),  # over-fitted at a fixed budget: falls with n
        (lambda n: 1.5 + 2.0 * n**-0.75, "power", 1.5),
    ],
)
def test_extrapolate_recovers_known_curve(curve, model: str, shift_inf: float) -> None:
    rng = np.random.default_rng(0)
    shifts = [curve(n) + rng.normal(0.0, 0.01) for n in N]
    fit = extrapolate_shift(N, shifts)
    assert fit["model"] == model
    assert fit["shift_inf"] == pytest.approx(shift_inf, abs=0.05)
    assert 0.0 < fit["shift_inf_std"] < 0.05
    true_fsr = curve(256) / shift_inf
    assert fit["fsr_est"] == pytest.approx(true_fsr, abs=3 * fit["fsr_std"] + 0.01)
    assert fit["lambda_est"] == pytest.approx(1.0 / fit["fsr_est"])
    assert fit["residual"] < 0.02


def test_extrapolate_reports_the_trend_of_the_curve() -> None:
    n = [8, 16, 32, 64, 128]
    assert extrapolate_shift(n, [3.0 - 8.0 / k for k in n])["trend"] == pytest.approx(1.0)
    assert extrapolate_shift(n, [3.0 + 8.0 / k for k in n])["trend"] == pytest.approx(-1.0)
    assert extrapolate_shift(n, [4.0, 5.0, 6.0, 5.0, 4.0])["trend"] == pytest.approx(0.0, abs=1e-12)  # a peak


def test_extrapolate_to_n_full() -> None:
    n = [10, 20, 40, 80]
    fit = extrapolate_shift(n, [2.0 + 4.0 / k for k in n], n_full=400)
    assert fit["model"] == "inv"
    assert fit["shift_inf"] == pytest.approx(2.01, abs=1e-6)
    assert fit["n_eval"] == 400


@pytest.mark.parametrize(
    ("n", "shift", "match"),
    [
        ([8, 8, 16, 16], [1.0, 1.1, 1.2, 1.3], "3 or more distinct"),
        ([8, 16, 32], [1.0, 2.0], "3 values but shift has 2"),
        ([0, 16, 32], [1.0, 2.0, 3.0], "subset size 0"),
        ([8, 16, 32], [1.0, math.nan, 3.0], "shift nan"),
    ],
)
def test_extrapolate_rejects(n: list[int], shift: list[float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        extrapolate_shift(n, shift)
    with pytest.raises(ConfigError, match="n_full=4"):
        extrapolate_shift([8, 16, 32], [1.0, 2.0, 3.0], n_full=4)
