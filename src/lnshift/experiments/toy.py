"""The paper's Gaussian study in miniature: does the LayerNorm shift track the data shift, and does
rescaling gamma by lambda = 1 / FSR bring a few-sample run closer to the fully representative one?

A small MLP (Linear -> LayerNorm -> GELU, twice, then a linear head) is pretrained on a source
Gaussian mixture S. A target T is the same mixture seen through an affine map of the inputs
(per-dimension scales and a translation, both growing with a magnitude), which mis-calibrates the
pretrained LayerNorms while the classes stay separable. LayerNorm affine + a fresh head are tuned on
the first n samples of a target pool, and on the whole pool (``n_star`` samples) as the stand-in
for T*. Every tuning run follows one schedule: the same optimiser steps, lr, batch size (drawn with
replacement, so a small n does not get exact full-batch steps), head initialisation and draws.

All runs train at once as a stack of independent models: the loss is the sum of their losses and
Adam and SGD act elementwise, so this equals training them one by one, in seconds on a CPU. All
randomness comes from generators seeded with ``seed``; the global torch RNG is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn import functional as F

from lnshift.analyses.fsr import extrapolate_shift, lambda_from_fsr, oracle_fsr
from lnshift.analyses.shift import layer_shift, rescale
from lnshift.errors import ConfigError

NORMS = ["ln1", "ln2"]
TUNED = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "head.weight", "head.bias")
SOURCE_SAMPLES, PRETRAIN_LR = 50000, 3e-3  # enough for the source model to reach the Bayes rate


def _linear(fan_out: int, fan_in: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Weight and bias drawn as torch.nn.Linear draws them, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    weight = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
    return weight, (torch.rand(fan_out, generator=gen) * 2 - 1) * bound


def _forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logits (R, B, classes) of R models on inputs (R, B, dim); the tuned parameters lead with R."""
    h = x
    for fc, ln in (("fc1", "ln1"), ("fc2", "ln2")):
        h = h @ params[fc + ".weight"].T + params[fc + ".bias"]
        h = F.layer_norm(h, h.shape[-1:])
        h = F.gelu(h * params[ln + ".weight"][:, None] + params[ln + ".bias"][:, None])
    return torch.einsum("rbh,rch->rbc", h, params["head.weight"]) + params["head.bias"][:, None]


def _train(
    params: dict[str, Tensor],
    names: Sequence[str],
    data: tuple[Tensor, Tensor, Tensor],
    steps: int,
    lr: float,
    batch: int,
    gen: torch.Generator,
    optimizer: str = "adam",
) -> None:
    """Adam (or SGD with momentum 0.9) on the summed per-model mean cross-entropy, in place.

    ``data`` is (x (R, N, dim), y (R, N), n (R,)): model r draws each batch, with replacement, from
    its first n[r] samples. All models share the uniform draws, so they differ only in n and data.
    """
    x, y, n = data
    trainable = [params[name].requires_grad_(True) for name in names]
    opt = torch.optim.Adam(trainable, lr=lr) if optimizer == "adam" else torch.optim.SGD(trainable, lr, 0.9)
    rows = torch.arange(len(x))[:, None]
    for _ in range(steps):
        idx = (torch.rand(batch, generator=gen) * n[:, None]).long()
        logits = _forward(params, x[rows, idx])
        loss = F.cross_entropy(logits.flatten(0, 1), y[rows, idx].flatten(), reduction="sum") / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
    for tensor in trainable:
        tensor.requires_grad_(False)


def _pretrain(
    dim: int, hidden: int, classes: int, source: tuple[Tensor, Tensor], steps: int, gen: torch.Generator
) -> dict[str, Tensor]:
    """Every parameter of the MLP trained on the source data; the tuned ones lead with a run axis of 1."""
    params = dict(zip(("fc1.weight", "fc1.bias"), _linear(hidden, dim, gen), strict=True))
    params.update(zip(("fc2.weight", "fc2.bias"), _linear(hidden, hidden, gen), strict=True))
    for norm in NORMS:
        params[norm + ".weight"], params[norm + ".bias"] = torch.ones(1, hidden), torch.zeros(1, hidden)
    head_w, head_b = _linear(classes, hidden, gen)
    params["head.weight"], params["head.bias"] = head_w[None], head_b[None]
    x, y = source
    _train(params, list(params), (x[None], y[None], torch.tensor([len(x)])), steps, PRETRAIN_LR, 256, gen)
    return params


def _accuracy(frozen: dict[str, Tensor], states: Sequence[dict[str, Tensor]], x: Tensor, y: Tensor) -> list[float]:
    """Test accuracy of each tuned state on its own inputs x[r] (R, N, dim) with labels y (N,)."""
    stacked = {key: torch.stack([state[key] for state in states]) for key in TUNED}
    with torch.no_grad():
        hits = _forward(frozen | stacked, x).argmax(-1) == y
    return hits.double().mean(1).tolist()


def _ln_distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """L2 distance between two runs over all LayerNorm gammas and betas together."""
    keys = [norm + suffix for norm in NORMS for suffix in (".weight", ".bias")]
    return math.sqrt(math.fsum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys))


def _gamma_cosine(base: dict[str, Tensor], a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Cosine between two runs' gamma shifts: whether a run moved in T*'s direction, not just how far."""
    keys = [norm + ".weight" for norm in NORMS]
    da = torch.cat([(a[k] - base[k]).double() for k in keys])
    db = torch.cat([(b[k] - base[k]).double() for k in keys])
    return float(da @ db / (da.norm() * db.norm()))


def _check(n_values: Sequence[int], n_star: int, magnitude_n: int, magnitudes: Sequence[float], optimizer: str) -> None:
    if not n_values or min(n_values) < 1 or max(n_values) > n_star:
        raise ConfigError(f"n_values={tuple(n_values)} must be non-empty and lie in [1, n_star={n_star}]")
    if not 1 <= magnitude_n <= n_star:
        raise ConfigError(f"magnitude_n={magnitude_n} must lie in [1, n_star={n_star}]")
    if not magnitudes:
        raise ConfigError("magnitudes is empty: give at least one domain-shift magnitude")
    if optimizer not in ("adam", "sgd"):
        raise ConfigError(f"optimizer {optimizer!r} is not 'adam' or 'sgd'")


@contextmanager
def _one_thread() -> Iterator[None]:
    """The study's tensors are tiny: more threads only add synchronisation, and stall on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def run_toy(
    seed: int = 0,
    n_values: Sequence[int] = (8, 16, 32, 64, 128, 256),
    n_star: int = 20000,
    dim: int = 16,
    classes: int = 4,
    hidden: int = 32,
    magnitude: float = 1.0,
    magnitudes: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    magnitude_n: int = 256,
    pretrain_steps: int = 600,
    steps: int = 300,
    lr: float = 1e-2,
    batch: int = 64,
    n_test: int = 20000,
    optimizer: str = "adam",
) -> dict:
    """Pretrain on S, tune LayerNorm + head on target subsets, and measure shifts, FSR and rescaling.

    The main study tunes on each of ``n_values`` (and T*) at domain-shift ``magnitude``; per n it
    reports the shifts, the oracle FSR against T*, lambda = 1 / FSR_gamma (clipped by
    ``lambda_from_fsr``), the LayerNorm distance to T* and the target test accuracy before and
    after rescaling gamma by lambda (the head is left as tuned). The magnitude study tunes on
    ``magnitude_n`` samples and on T* at each of ``magnitudes``, from the same draws, so only the
    magnitude differs. ``extrapolation`` compares ``extrapolate_shift`` on the per-n gamma shifts
    (to n_star) with the oracle FSR at the largest n. ``optimizer`` "sgd" (momentum 0.9) shows how
    much the FSR depends on the optimiser at one budget.

    How to read the distance figures: with d the run's gamma shift, d* T*'s and c their cosine,
    ||lam * d - d*|| is smallest at lam = c * ||d*|| / ||d||, about c / FSR. So lam = 1 / FSR < 1
    (an over-shifting run) always moves the run towards T* when c >= 0, while lam > 1 helps only if
    c > (1 + lam) / (2 * lam): amplifying a few-sample shift pays only if it points where T*'s does.
    ``cos_gamma_to_star`` reports c. (FSR here sums per-layer norms, so this holds approximately.)
    """
    _check(n_values, n_star, magnitude_n, magnitudes, optimizer)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, dim, generator=gen)
    means = 2.0 * directions / directions.norm(dim=1, keepdim=True)
    log_scale, translation = torch.rand(dim, generator=gen) * 2 - 1, torch.randn(dim, generator=gen)

    def sample(count: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(classes, (count,), generator=gen)
        return means[y] + torch.randn(count, dim, generator=gen), y

    def to_target(x: Tensor, level: float) -> Tensor:
        return x * torch.exp(level * log_scale) + level * translation

    params = _pretrain(dim, hidden, classes, sample(SOURCE_SAMPLES), pretrain_steps, gen)
    pretrained = {key: value[0] for key, value in params.items() if key in TUNED}
    frozen = {key: value for key, value in params.items() if key not in TUNED}
    base = {key: value for key, value in pretrained.items() if key.startswith(tuple(NORMS))}

    # Every (magnitude, n) run once, all on nested subsets of one pool seen through each magnitude.
    runs = list(
        dict.fromkeys(
            [(magnitude, n) for n in (*n_values, n_star)]
            + [(level, n) for level in magnitudes for n in (magnitude_n, n_star)]
        )
    )
    pool_x, pool_y = sample(n_star)
    test_x, test_y = sample(n_test)
    head_w, head_b = _linear(classes, hidden, gen)
    tuned = {key: value.expand(len(runs), *value.shape).clone() for key, value in base.items()}
    tuned["head.weight"], tuned["head.bias"] = (
        head_w.expand(len(runs), -1, -1).clone(),
        head_b.expand(len(runs), -1).clone(),
    )
    data = (
        torch.stack([to_target(pool_x, level) for level, _ in runs]),
        pool_y.expand(len(runs), -1),
        torch.tensor([n for _, n in runs]),
    )
    _train(frozen | tuned, TUNED, data, steps, lr, batch, gen, optimizer)

    def state(level: float, n: int) -> dict[str, Tensor]:
        return {key: value[runs.index((level, n))] for key, value in tuned.items()}

    test_xt = to_target(test_x, magnitude)
    star = state(magnitude, n_star)
    star_shift = layer_shift(base, star, NORMS)
    budget = {"run_steps": steps, "reference_steps": steps, "run_lr": lr, "reference_lr": lr}

    per_n = []
    for n in n_values:
        run = state(magnitude, n)
        shift = layer_shift(base, run, NORMS)
        fsr = oracle_fsr(shift, star_shift, budget)
        lam = lambda_from_fsr(fsr.fsr_gamma)
        rescaled = rescale(base, run, NORMS, lam, target="gamma")
        acc_before, acc_after, acc_star = _accuracy(frozen, [run, rescaled, star], test_xt.expand(3, -1, -1), test_y)
        per_n.append(
            {
                "n": n,
                "shift_gamma": shift.shift_gamma,
                "shift_beta": shift.shift_beta,
                "shift_ln": shift.shift_ln,
                "fsr_gamma": fsr.fsr_gamma,
                "fsr_ln": fsr.fsr_ln,
                "lambda": lam,
                "cos_gamma_to_star": _gamma_cosine(base, run, star),
                "dist_to_star_before": _ln_distance(run, star),
                "dist_to_star_after": _ln_distance(rescaled, star),
                "acc_before": acc_before,
                "acc_after": acc_after,
                "acc_star": acc_star,
            }
        )

    per_magnitude = []
    for level in magnitudes:
        shift = layer_shift(base, state(level, magnitude_n), NORMS)
        reference = layer_shift(base, state(level, n_star), NORMS)
        per_magnitude.append(
            {
                "magnitude": level,
                "shift_ln": shift.shift_ln,
                "shift_gamma": shift.shift_gamma,
                "shift_beta": shift.shift_beta,
                "shift_ln_star": reference.shift_ln,
                "fsr_gamma": oracle_fsr(shift, reference).fsr_gamma,
            }
        )

    extrapolation = None
    if len(set(n_values)) >= 3:
        fit = extrapolate_shift(list(n_values), [row["shift_gamma"] for row in per_n], n_full=n_star)
        largest = max(per_n, key=lambda row: row["n"])
        extrapolation = {
            "n": largest["n"],
            "model": fit["model"],
            "fsr_est": fit["fsr_est"],
            "fsr_std": fit["fsr_std"],
            "trend": fit["trend"],
            "fsr_oracle": largest["fsr_gamma"],
        }
    acc_source, acc_target = _accuracy(frozen, [pretrained] * 2, torch.stack([test_x, test_xt]), test_y)
    return {
        "seed": seed,
        "magnitude": magnitude,
        "acc_source": acc_source,
        "acc_target_source_model": acc_target,
        "shift_star": star_shift.to_dict(),
        "per_n": per_n,
        "per_magnitude": per_magnitude,
        "extrapolation": extrapolation,
    }


def toy_table(result: dict) -> str:
    """The study as fixed-width tables: per n, per magnitude, then the extrapolated FSR."""
    rows = [
        f"seed {result['seed']}, magnitude {result['magnitude']}: source model accuracy on S "
        f"{result['acc_source']:.3f}, on T {result['acc_target_source_model']:.3f}",
        f"{'n':>6} {'shift_g':>8} {'shift_b':>8} {'fsr_g':>7} {'lambda':>7} {'cos_T*':>7} {'dist_bef':>9} "
        f"{'dist_aft':>9} {'acc_bef':>8} {'acc_aft':>8} {'acc_T*':>7}",
    ]
    rows += [
        f"{r['n']:>6} {r['shift_gamma']:>8.3f} {r['shift_beta']:>8.3f} {r['fsr_gamma']:>7.3f} "
        f"{r['lambda']:>7.3f} {r['cos_gamma_to_star']:>7.3f} {r['dist_to_star_before']:>9.3f} "
        f"{r['dist_to_star_after']:>9.3f} "
        f"{r['acc_before']:>8.3f} {r['acc_after']:>8.3f} {r['acc_star']:>7.3f}"
        for r in result["per_n"]
    ]
    rows.append(f"{'magnitude':>9} {'shift_ln':>9} {'shift_g':>8} {'shift_b':>8} {'shift_ln_T*':>11} {'fsr_g':>7}")
    rows += [
        f"{r['magnitude']:>9.3g} {r['shift_ln']:>9.3f} {r['shift_gamma']:>8.3f} {r['shift_beta']:>8.3f} "
        f"{r['shift_ln_star']:>11.3f} {r['fsr_gamma']:>7.3f}"
        for r in result["per_magnitude"]
    ]
    ext = result["extrapolation"]
    if ext is not None:
        rows.append(
            f"FSR_gamma at n={ext['n']} extrapolated from the per-n shifts: {ext['fsr_est']:.3f} "
            f"± {ext['fsr_std']:.3f} ({ext['model']}, rank correlation of shift with n {ext['trend']:.2f}); "
            f"oracle {ext['fsr_oracle']:.3f}"
        )
    return "\n".join(rows)
