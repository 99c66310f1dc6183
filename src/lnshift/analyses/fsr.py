"""The Fine-tuning Shift Ratio (FSR) and the lambda that undoes it.

FSR = Shift(S -> T) / Shift(S -> T*) (Tan et al. 2025): the shift of a run on the training data
over the shift of a run on fully representative target data T*. FSR < 1 says the training data
under-represents the target, FSR > 1 that the run over-shifted; lambda = 1 / FSR rescales gamma so
that the run's shift matches T*'s. T* is never observed: ``oracle_fsr`` takes a stand-in run on
much more labelled target data, ``extrapolate_shift`` estimates it from runs on nested subsets.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.stats import spearmanr

from lnshift.analyses.shift import ShiftReport
from lnshift.errors import ConfigError


@dataclass
class FSRReport:
    """FSR per layer and for the summed shifts, with the schedules of both runs as given.

    A ratio is nan where the reference shift is 0 (e.g. beta of a norm without a bias).
    ``warnings`` says when the budget shows the two runs were not trained on the same schedule.
    """

    layers: list[dict]
    fsr_gamma: float
    fsr_beta: float
    fsr_ln: float
    budget: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return {
            "layers": [dict(layer) for layer in self.layers],
            "fsr_gamma": self.fsr_gamma,
            "fsr_beta": self.fsr_beta,
            "fsr_ln": self.fsr_ln,
            "budget": dict(self.budget),
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """A fixed-width table, one row per layer, then the ratios of the summed shifts."""
        width = max([len("layer"), len("total"), *(len(layer["name"]) for layer in self.layers)])
        header = f"{'layer':<{width}} {'fsr_gamma':>10} {'fsr_beta':>10}"
        rows = [header, "-" * len(header)]
        rows += [
            f"{layer['name']:<{width}} {layer['fsr_gamma']:>10.4g} {layer['fsr_beta']:>10.4g}" for layer in self.layers
        ]
        rows.append("-" * len(header))
        rows.append(f"{'total':<{width}} {self.fsr_gamma:>10.4g} {self.fsr_beta:>10.4g}")
        rows.append(f"fsr_ln = {self.fsr_ln:.4g}")
        if self.budget:
            rows.append("budget: " + ", ".join(f"{key}={value}" for key, value in self.budget.items()))
        rows += [f"warning: {message}" for message in self.warnings]
        return "\n".join(rows)


def _ratio(run: float, reference: float) -> float:
    return run / reference if reference != 0.0 else math.nan


def _budget_warnings(budget: dict) -> list[str]:
    """One warning per ``run_X`` / ``reference_X`` pair whose values differ."""
    messages = []
    for key, value in budget.items():
        if not key.startswith("run_") or "reference_" + key[4:] not in budget:
            continue
        other = budget["reference_" + key[4:]]
        if value != other:
            messages.append(
                f"{key}={value} but reference_{key[4:]}={other}: the runs had different schedules, "
                "so the FSR mixes the data shift with the optimisation budget"
            )
    return messages


def oracle_fsr(run: ShiftReport, reference: ShiftReport, budget: dict | None = None) -> FSRReport:
    """FSR of ``run`` against ``reference``, a run on fully representative target data (T*).

    The optimisation budget matters as much as the data: a run on few samples over-fits and can
    shift further, and a reference trained longer shifts further. The FSR is therefore only
    meaningful when both runs follow the same schedule (same number of optimisation steps or
    epochs, same lr). ``budget`` is recorded as given; each ``run_X`` / ``reference_X`` pair in it
    (e.g. ``{"run_steps": 500, "reference_steps": 2000}``) that differs adds a warning. Layers are
    matched by name, so both reports must cover the same norms.
    """
    run_names = [layer.name for layer in run.layers]
    ref_names = [layer.name for layer in reference.layers]
    if set(run_names) != set(ref_names):
        only_run = [name for name in run_names if name not in ref_names]
        only_ref = [name for name in ref_names if name not in run_names]
        raise ConfigError(
            "the run and reference cover different LayerNorms: first only in the run "
            f"{only_run[0] if only_run else None!r}, first only in the reference "
            f"{only_ref[0] if only_ref else None!r}"
        )
    by_name = {layer.name: layer for layer in reference.layers}
    layers = [
        {
            "name": layer.name,
            "fsr_gamma": _ratio(layer.gamma_l2, by_name[layer.name].gamma_l2),
            "fsr_beta": _ratio(layer.beta_l2, by_name[layer.name].beta_l2),
        }
        for layer in run.layers
    ]
    budget = dict(budget or {})
    return FSRReport(
        layers=layers,
        fsr_gamma=_ratio(run.shift_gamma, reference.shift_gamma),
        fsr_beta=_ratio(run.shift_beta, reference.shift_beta),
        fsr_ln=_ratio(run.shift_ln, reference.shift_ln),
        budget=budget,
        warnings=_budget_warnings(budget),
    )


def lambda_from_fsr(fsr: float, lo: float = 0.25, hi: float = 4.0) -> float:
    """lambda = 1 / FSR clipped to [lo, hi], so a noisy FSR cannot blow the shift up or erase it."""
    if not 0.0 < lo <= hi or not math.isfinite(hi):
        raise ConfigError(f"lambda bounds lo={lo!r}, hi={hi!r} must satisfy 0 < lo <= hi < inf")
    if not isinstance(fsr, numbers.Real) or not math.isfinite(fsr) or fsr <= 0.0:
        raise ConfigError(f"FSR {fsr!r} must be a finite positive number to give a lambda")
    return min(max(1.0 / fsr, lo), hi)


# Shift as a function of x = n / n_ref (n_ref = largest n): s_inf + a * x^-p, so that ``a`` is the
# excess of the shift at n_ref over the limit. The exponent is fixed (p = 1/2, p = 1) or fitted.
_MODELS: dict[str, tuple[Callable[..., np.ndarray], list[float], list[float]]] = {
    "inv_sqrt": (lambda x, s, a: s + a * x**-0.5, [0.0, -np.inf], [np.inf, np.inf]),
    "inv": (lambda x, s, a: s + a / x, [0.0, -np.inf], [np.inf, np.inf]),
    "power": (lambda x, s, a, p: s + a * x**-p, [0.0, -np.inf, 0.1], [np.inf, np.inf, 2.0]),
}
_PARAM_NAMES = {"inv_sqrt": ("shift_inf", "a"), "inv": ("shift_inf", "a"), "power": ("shift_inf", "a", "p")}


def _score(rss: float, n_points: int, k: int) -> float:
    """AICc for least squares; plain AIC where it is undefined (3 points, two-parameter models only)."""
    aic = n_points * math.log(max(rss, 1e-300) / n_points) + 2 * k
    return aic + (2 * k * (k + 1) / (n_points - k - 1) if n_points > k + 1 else 0.0)


def _slopes(model: str, params: np.ndarray, x: float) -> np.ndarray:
    """d shift(x) / d params, for the delta-method error of the extrapolated shift."""
    p = params[2] if model == "power" else {"inv_sqrt": 0.5, "inv": 1.0}[model]
    grad = [1.0, 0.0 if math.isinf(x) else x**-p]
    if model == "power":
        grad.append(0.0 if math.isinf(x) else -params[1] * x**-p * math.log(x))
    return np.array(grad)


def _check_points(n: Sequence[int], shift: Sequence[float], n_full: int | None) -> None:
    if len(n) != len(shift):
        raise ConfigError(f"n has {len(n)} values but shift has {len(shift)}")
    bad_n = [value for value in n if not (math.isfinite(value) and value > 0)]
    if bad_n:
        raise ConfigError(f"subset size {bad_n[0]!r} is not a positive number")
    bad_shift = [value for value in shift if not (math.isfinite(value) and value >= 0)]
    if bad_shift:
        raise ConfigError(f"shift {bad_shift[0]!r} is not a finite non-negative number")
    if len(set(n)) < 3:
        raise ConfigError(f"need shifts at 3 or more distinct subset sizes, got {sorted(set(n))}")
    if n_full is not None and not n_full >= max(n):
        raise ConfigError(f"n_full={n_full!r} is below the largest subset size {max(n)}")


def extrapolate_shift(n: Sequence[int], shift: Sequence[float], n_full: int | None = None) -> dict:
    """Estimate the FSR of the largest-n run from its shifts on nested subsets, without T*.

    ``shift[i]`` is the shift of a run on a subset of ``n[i]`` training samples (repeat an n for
    several seeds). The curve shift(n) = shift_inf + a * (n / n_ref)^-p, with n_ref the largest n,
    is extrapolated to n -> infinity, or to ``n_full`` if given. Why this form: the tuned
    parameters are the population optimum plus a sample-dependent error; an error that shrinks like
    n^-1/2 and is orthogonal to the true shift changes its norm by O(1/n) (p = 1), one that leans
    along it by O(n^-1/2) (p = 1/2), and the free exponent covers mixtures. ``a`` may have either
    sign: at a FIXED step budget a small subset is fitted harder and can shift MORE (a > 0, FSR > 1,
    curve falling with n), while a subset that misses parts of the target shifts less (a < 0,
    FSR < 1, curve rising). Exponential saturation was left out: sampling error decays
    polynomially, and an exponential would claim the shift stops changing after a few n0.

    The candidates are p = 1/2 ("inv_sqrt"), p = 1 ("inv") and a fitted p in [0.1, 2] ("power",
    only with 4+ distinct n and 5+ points), fitted by bounded least squares (shift_inf >= 0) and
    picked by the lowest AICc, fewer parameters first on ties.

    Assumptions: every subset was trained on the same schedule (steps, lr) as the largest one, the
    subsets are nested or i.i.d. draws from one pool, and the shift is monotone in n over and
    beyond the measured range. The extrapolation is only as good as these; check ``trend``,
    ``residual`` and ``shift_inf_std`` before trusting it. The monotone assumption can fail: in
    the toy study (``lnshift.experiments.toy``) with Adam, the shift peaks at an intermediate n and a fit over
    the whole range then puts FSR on the wrong side of 1; with a small budget (few steps or a low
    lr) the curve falls monotonically and the estimate lands within about 0.1 of the oracle FSR.

    Returns ``model``, ``params`` (named), ``shift_inf`` (the curve at n_full, or its limit),
    ``shift_inf_std`` (delta method on the fit covariance, scaled by the residuals,
    so a near-exact fit through few points understates it), ``fsr_est`` = mean measured shift at
    the largest n / shift_inf, ``fsr_std`` (delta method, ignoring the correlation between the two,
    which makes it conservative), ``lambda_est`` = ``lambda_from_fsr(fsr_est)`` (nan when fsr_est
    is not finite and positive), ``residual`` (RMS), ``trend`` (Spearman rank correlation of the
    mean shift per n with n: near +1 or -1 the curve is monotone, near 0 the fit is unreliable),
    ``n_ref``, ``n_eval`` and every candidate's ``params``, ``rss`` and ``score``.
    """
    _check_points(n, shift, n_full)
    n_arr, s_arr = np.asarray(n, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    n_ref = float(n_arr.max())
    x = n_arr / n_ref
    x_eval = math.inf if n_full is None else n_full / n_ref
    at_ref = s_arr[n_arr == n_ref]
    s_ref = float(at_ref.mean())
    sem_ref = float(at_ref.std(ddof=1) / math.sqrt(at_ref.size)) if at_ref.size > 1 else 0.0

    candidates: dict[str, dict] = {}
    fits = {}
    for name, (fn, lower, upper) in _MODELS.items():
        k = len(lower)
        if len(set(n)) <= k or (len(s_arr) <= k + 1 and k > 2):
            continue
        start = [max(s_ref, 1e-12), 0.0, 0.5][:k]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                params, cov = curve_fit(fn, x, s_arr, p0=start, bounds=(lower, upper))
        except RuntimeError:  # only "power" can fail to converge; the others are linear in their parameters
            continue
        rss = float(np.sum((s_arr - fn(x, *params)) ** 2))
        candidates[name] = {
            "params": dict(zip(_PARAM_NAMES[name], map(float, params), strict=True)),
            "rss": rss,
            "score": _score(rss, len(s_arr), k),
        }
        fits[name] = (fn, params, cov)
    model = min(candidates, key=lambda name: (candidates[name]["score"], len(fits[name][1])))
    fn, params, cov = fits[model]

    grad = _slopes(model, params, x_eval)
    shift_inf = float(params[0]) if math.isinf(x_eval) else float(fn(x_eval, *params))
    var_inf = float(grad @ cov @ grad) if np.all(np.isfinite(cov)) else math.inf
    shift_inf_std = math.sqrt(max(var_inf, 0.0))

    if shift_inf > 0.0:
        fsr_est = s_ref / shift_inf
        rel_ref = sem_ref / s_ref if s_ref > 0.0 else 0.0
        fsr_std = fsr_est * math.hypot(shift_inf_std / shift_inf, rel_ref)
    else:
        fsr_est, fsr_std = math.inf, math.inf
    valid = math.isfinite(fsr_est) and fsr_est > 0.0
    sizes = np.unique(n_arr)
    trend = spearmanr(sizes, [s_arr[n_arr == size].mean() for size in sizes]).statistic
    return {
        "model": model,
        "params": candidates[model]["params"],
        "shift_inf": shift_inf,
        "shift_inf_std": shift_inf_std,
        "fsr_est": fsr_est,
        "fsr_std": fsr_std,
        "lambda_est": lambda_from_fsr(fsr_est) if valid else math.nan,
        "residual": math.sqrt(candidates[model]["rss"] / len(s_arr)),
        "trend": float(trend),
        "n_ref": n_ref,
        "n_eval": n_full,
        "candidates": candidates,
    }
