"""The table GELU: exact on every bf16 input, the same function as nn.GELU, kernels equal to the lookup."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lnshift.backbones import gelu_table as gt
from lnshift.backbones import load_backbone

ALL_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical bf16 / float32 values, NaN equal to NaN, +0 equal to -0."""
    return (a == b) | (a.isnan() & b.isnan())


def test_gelu_is_correctly_rounded_on_every_bf16_input():
    x64 = ALL_BF16.double()
    finite = torch.isfinite(x64)
    ours = gt.gelu_lookup(ALL_BF16)
    exact64 = gt.gelu64(x64)
    exact = gt.round_bf16(exact64)
    assert same_bits(ours, exact).all()  # inf, -inf and NaN too: inf, NaN (-inf * 0), NaN, as torch's CUDA GELU
    # torch's own float32 GELU is the same function: within one bf16 ulp for 2**-100 <= |x| <= 3, where the
    # tanh approximation is up to 16 ulps off. Beyond that it depends on the CPU's vector code: below -3
    # float32's 1 + erf cancels and drifts toward 0, and the H200 machine's CPU flushes subnormals to 0
    # (127.5 ulps off) and gives NaN for inf
    theirs = F.gelu(ALL_BF16)
    ulps = (theirs.double() - exact64).abs() / bf16_ulp(exact64)
    assert ulps[finite & (x64.abs() <= 3) & (x64.abs() >= 2**-100)].max() <= 1


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values around float64 v (8 significant bits; subnormals from 2**-126 down)."""
    _, exponent = torch.frexp(v)
    return torch.ldexp(torch.ones_like(v), (exponent - 8).clamp(min=-133))


def test_slope_is_the_float32_rounding_of_the_exact_derivative():
    x64 = ALL_BF16.double()
    finite = torch.isfinite(x64)
    assert same_bits(gt.slope_lookup(ALL_BF16), gt.slope64(x64).float())[finite].all()
    assert gt.slope_lookup(ALL_BF16)[~finite].isnan().all()  # torch's gelu_backward gives NaN there too


def test_backward_is_torchs_gelu_backward_to_bf16_rounding():
    dy = torch.randn(ALL_BF16.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    ours = gt.gelu_bf16_backward(dy, ALL_BF16)
    expected = torch.ops.aten.gelu_backward(dy.float(), ALL_BF16.float())
    assert ours.dtype == torch.bfloat16
    assert same_bits(ours, expected.bfloat16()).float().mean() > 0.99  # the rest: torch's slope rounds
    # ours: the float32 product of the exact slope, rounded to bf16, so within half a unit (+ float32's)
    exact = dy.double() * gt.slope64(ALL_BF16.double())
    finite = torch.isfinite(exact)
    assert ((ours.double() - exact).abs() <= 0.5001 * bf16_ulp(exact))[finite].all()


def test_autograd_through_the_custom_op():
    x = (torch.randn(4, 33, generator=torch.Generator().manual_seed(1)) * 3).bfloat16().requires_grad_()
    y = gt.TableGELU()(x)
    assert same_bits(y, gt.gelu_lookup(x.detach())).all()
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert same_bits(dx, gt.gelu_bf16_backward(dy, x.detach())).all()
    # float32 (and every other dtype) goes through F.gelu unchanged
    x32 = torch.randn(7, 5, dtype=torch.float32)
    assert torch.equal(gt.TableGELU()(x32), F.gelu(x32))


def test_only_exact_gelus_are_swapped():
    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        timm.layers.activations.GELU(),
        timm.layers.QuickGELU(),
        nn.Sequential(transformers.activations.GELUActivation(), nn.ReLU()),
    )
    assert gt.use_table_gelu(model) == 3
    kinds = [type(m).__name__ for m in (model[0], model[1], model[2], model[3], model[4][0], model[4][1])]
    assert kinds == ["TableGELU", "GELU", "TableGELU", "QuickGELU", "TableGELU", "ReLU"]
    assert gt.use_table_gelu(model) == 0


def test_a_loaded_vit_trains_the_same_with_the_table_gelu():
    """The LayerNorm gradients of a tiny ViT in bf16 autocast, against the same model with nn.GELU."""
    torch.manual_seed(0)
    backbone = load_backbone("test_vit", pretrained=False, model_kwargs={"img_size": 32}, fast_paths=["table_gelu"])
    acts = [m for m in backbone.modules() if isinstance(m, gt.TableGELU)]
    assert len(acts) == len(backbone.model.blocks) > 0
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def ln_grads(model: nn.Module) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "norm" in n])

    ours = ln_grads(backbone)
    for block in backbone.model.blocks:
        block.mlp.act = nn.GELU()
    plain = ln_grads(backbone)
    torch.testing.assert_close(ours, plain, rtol=0.05, atol=1e-3 * plain.abs().max().item())


def test_kernels_equal_the_lookup(device):
    """The CUDA kernels (on the CPU run by Triton's interpreter) bit for bit against the torch lookup."""
    pytest.importorskip("triton")
    script = """
import sys
import torch
from lnshift.backbones import gelu_table as gt
from lnshift.backbones.gelu_kernel import BLOCK, gelu_backward, gelu_forward
dev = torch.device(sys.argv[1])
x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
x = torch.cat([x, x[: BLOCK // 3]])  # a last block that is partly outside
dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
gelu, slope = gt.tables(dev)
xd, dyd = x.to(dev), dy.to(dev)
fwd = lambda x: gelu_forward(x, gelu, gt.GELU_LAYOUT)
bwd = lambda dy, x: gelu_backward(dy, x, slope, gt.SLOPE_LAYOUT)
assert fwd(xd[:0]).shape == bwd(dyd[:0], xd[:0]).shape == (0,)
pairs = [(fwd(xd), gt.gelu_lookup(x)), (bwd(dyd, xd), gt.gelu_bf16_backward(dy, x))]
print(sum(int((a.cpu().view(torch.int16) != b.view(torch.int16)).logical_and(~(a.cpu().isnan() & b.isnan())).sum())
          for a, b in pairs))
"""
    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if device == "cpu" else {})}
    done = subprocess.run([sys.executable, "-c", script, device], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "0"


def test_without_triton_the_lookup_runs(monkeypatch):
    """Where Triton is missing (CUDA without it), the ops fall back to the torch lookup."""
    x = (torch.randn(3, 17, generator=torch.Generator().manual_seed(3)) * 4).bfloat16()
    monkeypatch.setattr(gt, "triton_kernels", lambda: None)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    y, dx = gt.gelu_bf16(x), gt.gelu_bf16_backward(x, x)
    monkeypatch.undo()
    assert same_bits(y, gt.gelu_lookup(x)).all()
    assert same_bits(dx, (x.float() * gt.slope_lookup(x)).bfloat16()).all()
