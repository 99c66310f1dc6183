"""Data-parallel conventions shared by the input pipelines, the loop and evaluation.

A global batch is cut into contiguous slices, one per process, so a run on W processes sees exactly
the samples (and augmentations) of a one-process run with the same global batch. Evaluation sets are
cut into contiguous chunks without padding, so gathered metrics count every sample exactly once.
"""

from __future__ import annotations


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of process `rank`'s contiguous share of n items; shares differ by at most one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
