"""Summary statistics for sweep reports: mean ± std, bootstrap intervals and paired tests over seeds.

Sweeps have few seeds per cell (often 3 to 5), so every figure states how many values it rests on,
and intervals are percentile bootstraps of the mean: no normality assumption, honest about width.
Paired comparisons match runs on (dataset, regime, seed), which removes the variance that the seed
and the data subset share between two methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import bootstrap, wilcoxon

N_BOOT = 10_000
LEVEL = 0.95


def _array(values: Sequence[float]) -> np.ndarray:
    """Finite values only: a diverged run's nan must not silently poison a whole cell's mean."""
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); std is nan for a single value, both nan for none."""
    x = _array(values)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def bootstrap_ci(
    values: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (scipy); seeded, so a report is the same every time it is built.

    With one value the interval is that value (scipy needs two); with none it is (nan, nan).
    """
    x = _array(values)
    if x.size < 2:
        return (float(x[0]), float(x[0])) if x.size else (math.nan, math.nan)
    ci = bootstrap(
        (x,),
        np.mean,
        confidence_level=level,
        n_resamples=n_boot,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


@dataclass
class PairedComparison:
    """`a` against `b` over matched pairs: differences are a - b."""

    n_pairs: int
    mean_diff: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    wilcoxon_stat: float
    p_value: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_compare(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0
) -> PairedComparison:
    """Wilcoxon signed-rank test (two-sided, scipy) and a paired bootstrap interval of the mean difference.

    Pairs where either value is not finite are dropped. Zero differences are dropped by the test
    (Wilcoxon's convention); when every difference is zero the methods are indistinguishable and
    p = 1 (scipy would warn and compute a 0/0 z-score on the way).
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.size} and {b_arr.size}")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    diff = a_arr[keep] - b_arr[keep]
    n = int(diff.size)
    wins, ties, losses = int((diff > 0).sum()), int((diff == 0).sum()), int((diff < 0).sum())
    if n == 0:
        stat, p = math.nan, math.nan
    elif wins + losses == 0:
        stat, p = 0.0, 1.0
    else:
        result = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
        stat, p = float(result.statistic), float(result.pvalue)
    low, high = bootstrap_ci(diff, level, n_boot, seed)
    mean = float(diff.mean()) if n else math.nan
    return PairedComparison(n, mean, low, high, wins, ties, losses, stat, p)
