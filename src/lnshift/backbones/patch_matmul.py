"""A ViT's patch embedding (a Conv2d whose kernel equals its stride) run as one matrix product.

A ViT's patch embedding is a strided convolution over 3 input channels. cuDNN runs it with a generic
kernel and layout conversions, many times slower than the same work as one GEMM (the figures are in
benchmarks/results/README.md, "What each fast path saves"). Cutting the image into patches and
multiplying by the flattened kernel is the same linear map
(only the summation order differs), keeps the conv's parameters and state-dict keys, and works in
every backbone family because it swaps the class of the Conv2d module in place. Only the patch
embedding is swapped (each family names it in `Backbone.patch_convs`), never another conv of the
model; backbones/fastpath.py decides when (the fast path `patch_matmul`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor, nn


class PatchConv2d(nn.Conv2d):
    """A non-overlapping, unpadded Conv2d computed as patches @ flattened kernel (same parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        gh, gw = h // kh, w // kw  # a conv with stride = kernel ignores the remainder rows / columns
        patches = x[:, :, : gh * kh, : gw * kw].reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(b, gh, gw, c * kh * kw), self.weight.reshape(self.out_channels, -1), self.bias)
        # (b, out, gh, gw) like the conv's output; channels-last in memory, so the usual
        # flatten(2).transpose(1, 2) to tokens is a view
        return out.permute(0, 3, 1, 2)


def is_patch_conv(module: nn.Module) -> bool:
    """A plain Conv2d that cuts its input into non-overlapping patches (what PatchConv2d computes exactly)."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == module.stride
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def use_patch_matmul(model: nn.Module, paths: Iterable[str]) -> int:
    """Run the convs at `paths` (submodule names of `model`; absent ones are skipped) as matrix products
    where they cut non-overlapping patches; returns how many were switched."""
    modules = dict(model.named_modules())
    convs = [modules[path] for path in paths if path in modules and is_patch_conv(modules[path])]
    for conv in convs:
        conv.__class__ = PatchConv2d
    return len(convs)
