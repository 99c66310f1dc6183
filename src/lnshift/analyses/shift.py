"""The LayerNorm shift: how far fine-tuning moved each LayerNorm's gamma and beta, and rescaling it.

Shift_ln in Tan et al. (2025) sums, over the LayerNorm layers, the L2 distance between fine-tuned
and pretrained affine parameters. The paper does not say whether beta counts, so gamma and beta are
reported separately (``shift_gamma``, ``shift_beta``) and ``shift_ln`` is their sum.

State dicts map parameter names to tensors; a norm ``name`` owns ``name.weight`` (gamma) and
``name.bias`` (beta). All arithmetic runs in float64 on the CPU, so fp16/bf16 weights lose nothing further.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lnshift.errors import ConfigError

TARGETS = {"gamma": (".weight",), "beta": (".bias",), "both": (".weight", ".bias")}


@dataclass
class LayerShift:
    """One LayerNorm's shift; ``*_rel`` is ||tuned - base|| / ||base||.

    A zero pretrained norm gives rel = inf when the parameter moved and 0 when it did not, so that a
    ratio is never silently nan.
    """

    name: str
    gamma_l2: float
    beta_l2: float
    gamma_rel: float
    beta_rel: float


@dataclass
class ShiftReport:
    """Per-layer shifts and their sums over layers (``shift_ln = shift_gamma + shift_beta``).

    ``no_bias`` names the norms without a beta; their beta figures are 0.
    """

    layers: list[LayerShift]
    shift_gamma: float
    shift_beta: float
    shift_ln: float
    no_bias: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict with the fixed keys shared by every run's metrics file."""
        return {
            "layers": [
                {
                    "name": layer.name,
                    "gamma_l2": layer.gamma_l2,
                    "beta_l2": layer.beta_l2,
                    "gamma_rel": layer.gamma_rel,
                    "beta_rel": layer.beta_rel,
                }
                for layer in self.layers
            ],
            "shift_gamma": self.shift_gamma,
            "shift_beta": self.shift_beta,
            "shift_ln": self.shift_ln,
        }

    def table(self) -> str:
        """A fixed-width table, one row per layer, then the totals."""
        width = max([len("layer"), len("total"), *(len(layer.name) + 1 for layer in self.layers)])
        header = f"{'layer':<{width}} {'gamma_l2':>10} {'beta_l2':>10} {'gamma_rel':>10} {'beta_rel':>10}"
        rows = [header, "-" * len(header)]
        for layer in self.layers:
            mark = "*" if layer.name in self.no_bias else ""
            rows.append(
                f"{layer.name + mark:<{width}} {layer.gamma_l2:>10.4g} {layer.beta_l2:>10.4g} "
                f"{layer.gamma_rel:>10.4g} {layer.beta_rel:>10.4g}"
            )
        rows.append("-" * len(header))
        rows.append(f"{'total':<{width}} {self.shift_gamma:>10.4g} {self.shift_beta:>10.4g}")
        rows.append(f"shift_ln = shift_gamma + shift_beta = {self.shift_ln:.4g}")
        if self.no_bias:
            rows.append("* no bias (beta figures are 0)")
        return "\n".join(rows)


def _pair(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], key: str) -> tuple[Tensor, Tensor]:
    """The pretrained and tuned tensor for ``key``, checked to exist in both with one shape."""
    for label, state in (("base", base), ("tuned", tuned)):
        if key not in state:
            raise ConfigError(f"parameter {key!r} is missing from the {label} state dict")
    b, t = base[key], tuned[key]
    if b.shape != t.shape:
        raise ConfigError(f"parameter {key!r} is {tuple(b.shape)} in base but {tuple(t.shape)} in tuned")
    return b, t


def _has_bias(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], norm: str) -> bool:
    """Whether ``norm`` has a beta; having it in only one of the two state dicts is an error."""
    key = norm + ".bias"
    if (key in base) != (key in tuned):
        where = "base" if key in base else "tuned"
        raise ConfigError(f"parameter {key!r} is only in the {where} state dict")
    return key in base


def _f64(x: Tensor) -> Tensor:
    """A float64 CPU copy: LayerNorm parameters are small, and some accelerators lack float64."""
    return x.detach().to(device="cpu", dtype=torch.float64)


def _distance(b: Tensor, t: Tensor) -> tuple[float, float]:
    """The L2 norm of t - b and its size relative to ||b||, in float64."""
    b64, t64 = _f64(b), _f64(t)
    l2 = torch.linalg.vector_norm(t64 - b64).item()
    ref = torch.linalg.vector_norm(b64).item()
    if ref == 0.0:
        return l2, (math.inf if l2 > 0.0 else 0.0)
    return l2, l2 / ref


def layer_shift(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], norms: Sequence[str]) -> ShiftReport:
    """Measure how far each norm in ``norms`` moved from ``base`` (pretrained) to ``tuned``."""
    if not norms:
        raise ConfigError("norms is empty: name at least one LayerNorm to measure")
    layers, no_bias = [], []
    for norm in norms:
        gamma_l2, gamma_rel = _distance(*_pair(base, tuned, norm + ".weight"))
        if _has_bias(base, tuned, norm):
            beta_l2, beta_rel = _distance(*_pair(base, tuned, norm + ".bias"))
        else:
            beta_l2, beta_rel = 0.0, 0.0
            no_bias.append(norm)
        layers.append(LayerShift(norm, gamma_l2, beta_l2, gamma_rel, beta_rel))
    shift_gamma = math.fsum(layer.gamma_l2 for layer in layers)
    shift_beta = math.fsum(layer.beta_l2 for layer in layers)
    return ShiftReport(layers, shift_gamma, shift_beta, shift_gamma + shift_beta, no_bias)


def _interpolate(b: Tensor, t: Tensor, lam: float) -> Tensor:
    """base + lam * (tuned - base) in float64, cast to tuned's dtype; lam 0 and 1 copy exactly."""
    if lam == 0.0:
        return b.detach().to(dtype=t.dtype, device=t.device, copy=True)
    if lam == 1.0:
        return t.detach().clone()
    b64, t64 = _f64(b), _f64(t)
    return (b64 + lam * (t64 - b64)).to(device=t.device, dtype=t.dtype)


def _targeted_keys(
    base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], norms: Sequence[str], target: str
) -> list[str]:
    """The parameter names that ``target`` selects; a norm without a bias has no beta to rescale."""
    if target not in TARGETS:
        raise ConfigError(f"target {target!r} is not one of {sorted(TARGETS)}")
    if not norms:
        raise ConfigError("norms is empty: name at least one LayerNorm to rescale")
    keys = []
    for norm in norms:
        for suffix in TARGETS[target]:
            if suffix == ".bias" and not _has_bias(base, tuned, norm):
                continue
            _pair(base, tuned, norm + suffix)
            keys.append(norm + suffix)
    return keys


def _check_lam(lam: float) -> float:
    """``lam`` as a float; nan, inf and non-numbers would silently corrupt every targeted tensor."""
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam):
        raise ConfigError(f"lambda {lam!r} is not a finite real number")
    return float(lam)


def rescale(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    norms: Sequence[str],
    lam: float,
    target: str = "gamma",
) -> dict[str, Tensor]:
    """A new state dict equal to ``tuned`` but with the targeted shift scaled by ``lam``.

    Each targeted parameter becomes base + lam * (tuned - base): lam = 1 keeps the fine-tuned value,
    0 restores the pretrained one, values in (0, 1) interpolate (as WiSE-FT), > 1 extrapolate and
    < 0 reverse the shift. ``target`` is "gamma" (the paper's choice: beta stays as fine-tuned),
    "beta" or "both". lam = 1 and lam = 0 return copies of tuned and base bit for bit. Otherwise the
    arithmetic is float64 and the result is cast to tuned's dtype, so rescaling the result again
    with 1 / lam returns ``tuned`` exactly in float64 and up to that dtype's rounding otherwise.
    Every returned tensor is a copy: the result shares no storage with the inputs.
    """
    lam = _check_lam(lam)
    keys = set(_targeted_keys(base, tuned, norms, target))
    return {
        key: _interpolate(base[key], value, lam) if key in keys else value.detach().clone()
        for key, value in tuned.items()
    }


def rescale_batch(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    norms: Sequence[str],
    lams: Sequence[float],
    target: str = "gamma",
) -> dict[str, Tensor]:
    """The targeted parameters for a whole grid of lambdas, stacked as (len(lams), *shape).

    Only the targeted parameters are returned, so a caller can vmap a functional call over the
    lambda axis and pass the untouched parameters unbatched. Row i equals ``rescale`` with lams[i].
    """
    if len(lams) == 0:
        raise ConfigError("lams is empty: give at least one lambda")
    checked = [_check_lam(lam) for lam in lams]
    return {
        key: torch.stack([_interpolate(base[key], tuned[key], lam) for lam in checked])
        for key in _targeted_keys(base, tuned, norms, target)
    }
