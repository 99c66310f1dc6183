"""Shared by the tests: options for timm's tiny random test ViT at 32 px (no workers, no bars), a
comparison of a loaded backbone's outputs with its source model's, and the distance between two runs."""

import torch

TINY_MODEL = ["--model", "lnshift/test-vit", "--model-kwargs", "{img_size: 32, patch_size: 8}"]
TINY = [*TINY_MODEL, "--min-epoch-steps", "1", "--workers", "0", "--progress", "false"]


def same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to summation order: lnshift runs patch embeddings as a matrix product
    (backbones.patch_matmul) and, with class-token pooling, the last block's tail on one token
    (backbones.timm_backbone). Weights loaded wrongly differ by orders of magnitude more."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two state dicts with the same keys."""
    return max((a[k] - b[k]).abs().max().item() for k in a)
