"""Patch embeddings as matrix products (the fast path `patch_matmul`): the same map as the conv, and only
the model's patch embedding is swapped."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lnshift.backbones import load_backbone
from lnshift.backbones.patch_matmul import PatchConv2d, is_patch_conv, use_patch_matmul


@pytest.mark.parametrize(
    ("kernel", "size", "bias"),
    [((4, 4), (32, 32), True), ((2, 3), (9, 10), False), ((8, 8), (35, 33), True)],  # last: a remainder
)
def test_equals_the_conv(kernel: tuple[int, int], size: tuple[int, int], bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=kernel, bias=bias).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, conv.weight, conv.bias, stride=kernel)
    assert use_patch_matmul(conv, [""]) == 1 and type(conv) is PatchConv2d
    out = conv(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # the gradients the LayerNorm tuning backpropagates through it (and the weight's, for full tuning)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, conv.weight), g_out)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight), g_out)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 4, stride=2),  # overlapping
        nn.Conv2d(3, 4, 4, stride=4, padding=1),
        nn.Conv2d(4, 4, 4, stride=4, groups=2),
        nn.Conv2d(3, 4, 3, stride=3, dilation=2),
        nn.Conv1d(3, 4, 4, stride=4),
    ],
)
def test_other_convs_are_left_alone(conv: nn.Module) -> None:
    assert not is_patch_conv(conv)
    assert use_patch_matmul(conv, [""]) == 0 and type(conv) is not PatchConv2d


def test_only_the_named_patch_embedding_is_swapped() -> None:
    model = nn.ModuleDict({"embed": nn.Conv2d(3, 4, 4, stride=4), "pool": nn.Conv2d(4, 4, 2, stride=2)})
    assert use_patch_matmul(model, ["embed", "absent.proj"]) == 1
    assert type(model["embed"]) is PatchConv2d and type(model["pool"]) is nn.Conv2d


def test_loaded_vit_keeps_its_weights_and_outputs() -> None:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8}
    backbone = load_backbone("test_vit", pretrained=False, model_kwargs=kwargs, fast_paths=["patch_matmul"])
    model = backbone.model
    assert type(model.patch_embed.proj) is PatchConv2d and backbone.fast_paths == ["patch_matmul"]
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8).eval()
    assert list(reference.state_dict()) == list(model.state_dict())
    reference.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
