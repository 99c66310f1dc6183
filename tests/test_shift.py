"""LayerNorm shift figures on hand-built state dicts, and exactness of rescaling."""

import math

import pytest
import torch

from lnshift.analyses.shift import layer_shift, rescale, rescale_batch
from lnshift.errors import ConfigError

NORMS = ["blocks.0.norm1", "norm"]


def _pair(dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Deltas are 3-4-5 triangles, so every L2 figure is exact: gamma moves 5 and 10, beta 5 and 0."""
    base = {
        "blocks.0.norm1.weight": torch.tensor([1.0, 1.0]),
        "blocks.0.norm1.bias": torch.tensor([0.0, 0.0]),
        "norm.weight": torch.tensor([6.0, 8.0]),
        "norm.bias": torch.tensor([0.5, -0.5]),
        "head.weight": torch.ones(3, 2),
    }
    tuned = {
        "blocks.0.norm1.weight": torch.tensor([4.0, 5.0]),
        "blocks.0.norm1.bias": torch.tensor([3.0, -4.0]),
        "norm.weight": torch.tensor([0.0, 0.0]),
        "norm.bias": torch.tensor([0.5, -0.5]),
        "head.weight": torch.full((3, 2), 2.0),
    }
    return ({k: v.to(dtype) for k, v in base.items()}, {k: v.to(dtype) for k, v in tuned.items()})


def test_layer_shift_hand_computed() -> None:
    report = layer_shift(*_pair(), NORMS)
    first, last = report.layers
    assert first.name == "blocks.0.norm1"
    assert (first.gamma_l2, first.beta_l2) == (5.0, 5.0)
    assert first.gamma_rel == pytest.approx(5.0 / math.sqrt(2.0))
    assert first.beta_rel == math.inf  # beta starts at 0 and moved
    assert (last.gamma_l2, last.beta_l2) == (10.0, 0.0)
    assert last.gamma_rel == pytest.approx(1.0)
    assert last.beta_rel == 0.0
    assert (report.shift_gamma, report.shift_beta, report.shift_ln) == (15.0, 5.0, 20.0)


def test_zero_pretrained_and_unmoved_gives_zero_rel() -> None:
    zeros = {"n.weight": torch.zeros(3), "n.bias": torch.zeros(3)}
    report = layer_shift(zeros, zeros, ["n"])
    assert report.layers[0].gamma_rel == 0.0
    assert report.shift_ln == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_dtypes_give_the_same_figures(dtype: torch.dtype) -> None:
    assert layer_shift(*_pair(dtype), NORMS).shift_ln == 20.0


def test_to_dict_has_exactly_the_agreed_keys() -> None:
    d = layer_shift(*_pair(), NORMS).to_dict()
    assert set(d) == {"layers", "shift_gamma", "shift_beta", "shift_ln"}
    assert [set(layer) for layer in d["layers"]] == [{"name", "gamma_l2", "beta_l2", "gamma_rel", "beta_rel"}] * 2
    assert d["layers"][1]["gamma_l2"] == 10.0


def test_table_lists_every_layer_and_the_totals() -> None:
    table = layer_shift(*_pair(), NORMS).table()
    for name in NORMS:
        assert name in table
    assert "total" in table
    assert "20" in table.splitlines()[-1]


def test_norm_without_bias_counts_zero_beta_and_is_noted() -> None:
    base, tuned = _pair()
    del base["norm.bias"], tuned["norm.bias"]
    report = layer_shift(base, tuned, NORMS)
    assert report.no_bias == ["norm"]
    assert report.layers[1].beta_l2 == 0.0
    assert "no bias" in report.table()


@pytest.mark.parametrize(
    ("drop_from", "key"),
    [(0, "norm.weight"), (1, "norm.weight"), (0, "norm.bias"), (1, "blocks.0.norm1.bias")],
)
def test_missing_parameter_is_named(drop_from: int, key: str) -> None:
    pair = _pair()
    del pair[drop_from][key]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        layer_shift(*pair, NORMS)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        rescale(*pair, NORMS, 2.0, target="both")


def test_shape_mismatch_and_empty_norms_are_errors() -> None:
    base, tuned = _pair()
    tuned["norm.weight"] = torch.zeros(3)
    with pytest.raises(ConfigError, match=r"norm\.weight"):
        layer_shift(base, tuned, NORMS)
    with pytest.raises(ConfigError, match="empty"):
        layer_shift(base, tuned, [])


def test_rescale_gamma_only_by_default() -> None:
    base, tuned = _pair()
    out = rescale(base, tuned, NORMS, 2.0)
    assert torch.equal(out["blocks.0.norm1.weight"], torch.tensor([7.0, 9.0]))
    assert torch.equal(out["norm.weight"], torch.tensor([-6.0, -8.0]))
    for key in ("blocks.0.norm1.bias", "norm.bias", "head.weight"):
        assert torch.equal(out[key], tuned[key])
        assert out[key].data_ptr() != tuned[key].data_ptr()
    assert layer_shift(base, out, NORMS).shift_gamma == 30.0


@pytest.mark.parametrize(("target", "gamma_moves", "beta_moves"), [("beta", False, True), ("both", True, True)])
def test_rescale_targets(target: str, gamma_moves: bool, beta_moves: bool) -> None:
    base, tuned = _pair()
    out = rescale(base, tuned, NORMS, -1.0, target=target)
    report = layer_shift(base, out, NORMS)
    assert report.shift_gamma == 15.0 and report.shift_beta == 5.0  # lam = -1 keeps the length
    assert torch.equal(out["blocks.0.norm1.weight"], tuned["blocks.0.norm1.weight"]) != gamma_moves
    assert torch.equal(out["blocks.0.norm1.bias"], torch.tensor([-3.0, 4.0])) == beta_moves


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rescale_lam_one_and_zero_are_bit_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {
        "n.weight": torch.randn(64, generator=gen).to(dtype),
        "n.bias": torch.randn(64, generator=gen).to(dtype),
    }
    tuned = {
        key: (value.double() + 0.1 * torch.randn(64, generator=gen, dtype=torch.float64)).to(dtype)
        for key, value in base.items()
    }
    same = rescale(base, tuned, ["n"], 1.0, target="both")
    back = rescale(base, tuned, ["n"], 0, target="both")
    for key in base:
        assert same[key].dtype == dtype and torch.equal(same[key], tuned[key])
        assert back[key].dtype == dtype and torch.equal(back[key], base[key])


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 2e-7), (torch.float64, 1e-15)])
def test_rescale_round_trip(dtype: torch.dtype, rtol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"n.weight": (1 + 0.1 * torch.randn(256, generator=gen)).to(dtype)}
    tuned = {
        "n.weight": (base["n.weight"].double() + 0.05 * torch.randn(256, generator=gen, dtype=torch.float64)).to(dtype)
    }
    there = rescale(base, tuned, ["n"], 2.0)
    again = rescale(base, there, ["n"], 0.5)
    assert again["n.weight"].dtype == dtype
    torch.testing.assert_close(again["n.weight"], tuned["n.weight"], rtol=rtol, atol=0.0)


def test_rescale_errors() -> None:
    with pytest.raises(ConfigError, match="'scale'"):
        rescale(*_pair(), NORMS, 2.0, target="scale")
    for lam in (math.nan, math.inf, "2"):
        with pytest.raises(ConfigError, match="lambda"):
            rescale(*_pair(), NORMS, lam)


def test_rescale_batch_matches_rescale_per_lambda() -> None:
    base, tuned = _pair(torch.bfloat16)
    lams = [0.0, 0.5, 1.0, 1.7, -0.3]
    batch = rescale_batch(base, tuned, NORMS, lams, target="both")
    assert set(batch) == {f"{norm}.{p}" for norm in NORMS for p in ("weight", "bias")}
    for i, lam in enumerate(lams):
        single = rescale(base, tuned, NORMS, lam, target="both")
        for key, stacked in batch.items():
            assert stacked.shape == (len(lams), *tuned[key].shape) and stacked.dtype == torch.bfloat16
            assert torch.equal(stacked[i], single[key])
    with pytest.raises(ConfigError, match="empty"):
        rescale_batch(base, tuned, NORMS, [])
