"""Several LayerNorm variants in one forward pass: block k of a batch goes through variant k's gamma and beta.

A batch of n x B inputs is read as n blocks of B. Every patched norm normalises the whole batch
without its affine parameters, then scales and shifts block k with row k of an (n, C) stack. The
frozen backbone weights are read once for all variants. The lambda grid (lambdas.py) uses it to
score rescaled models, and batched training (batched.py) to train R runs at once: the stacks may
be trainable Parameters, and the patch is differentiable and works under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import is_rms
from ..errors import ModelError


def normaliser(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm's own normalisation without its affine parameters: LayerNorm, or an RMSNorm (torch or timm)."""
    if isinstance(module, nn.LayerNorm):
        return partial(F.layer_norm, normalized_shape=module.normalized_shape, eps=module.eps)
    if is_rms(module) and hasattr(module, "normalized_shape"):
        return partial(F.rms_norm, normalized_shape=module.normalized_shape, eps=module.eps)
    raise ModelError(f"{type(module).__name__} cannot be batched: only LayerNorm and torch / timm RMSNorm")


def repeat_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """The same inputs once per variant: (B, ...) -> (n * B, ...), block k being variant k's copy."""
    return x.repeat(n, *([1] * (x.dim() - 1)))


@contextlib.contextmanager
def batched_layernorms(
    model: nn.Module, norms: Sequence[str], params: Mapping[str, torch.Tensor], n_variants: int
) -> Iterator[None]:
    """Make each norm in `norms` apply variant k's affine parameters to the k-th block of the batch.

    `params` maps `norm.weight` / `norm.bias` to stacks of shape (n_variants, C); a missing entry keeps
    the module's own parameter for every variant. The mapping is read at every call, so optimiser
    updates of trainable stacks, and entries the caller replaces, take effect at the next forward pass.
    """
    modules = dict(model.named_modules())
    saved = {}
    for name in norms:
        m = modules[name]
        norm = normaliser(m)
        own_gamma = m.weight.detach().expand(n_variants, -1)
        own_beta = m.bias.detach().expand(n_variants, -1) if getattr(m, "bias", None) is not None else None

        def forward(
            x: torch.Tensor, norm=norm, name: str = name, own_gamma=own_gamma, own_beta=own_beta
        ) -> torch.Tensor:
            gamma = params.get(f"{name}.weight", own_gamma)
            beta = params.get(f"{name}.bias", own_beta)
            y = norm(x)
            y = y.view(n_variants, -1, *y.shape[1:])
            shape = (n_variants,) + (1,) * (y.dim() - 2) + (y.shape[-1],)
            g = gamma.to(y.dtype).view(shape)
            y = y * g if beta is None else torch.addcmul(beta.to(y.dtype).view(shape), y, g)
            return y.view(-1, *y.shape[2:])

        saved[name] = m.forward
        m.forward = forward
    try:
        yield
    finally:
        for name, fwd in saved.items():
            modules[name].forward = fwd
