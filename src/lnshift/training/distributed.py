"""Data parallelism: one run as several processes (one per GPU) started by torchrun, as in docs/distributed.md.

A global batch is cut into contiguous slices, one per process, so a run on W processes sees exactly the
samples of a one-process run with the same global batch. Evaluation sets are cut into contiguous chunks
without padding and the outputs gathered in rank order, so metrics count every sample exactly once.
Only rank 0 writes the run directory (rundir.atomic_write); what it reads there it sends to the others
(`from_main`), so the ranks never depend on a shared filesystem and always take the same decisions.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, Dataset, Sampler, Subset

from ..errors import ConfigError

T = TypeVar("T")
IGNORE = -100  # nn.CrossEntropyLoss's ignore_index: the label of a placeholder sample, which adds nothing


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of process `rank`'s contiguous share of n items; shares differ by at most one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def world() -> int:
    """Number of processes in the run (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The process that writes the run directory and prints: rank 0, or a process on its own."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (which sets these variables), possibly as a single process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_devices(n: int, device: torch.device) -> None:
    """n processes on GPUs need n unpinned GPUs of this machine; on CPU (a test of the setup) any n will do."""
    if device.type != "cuda":
        return
    if device.index is not None:
        raise ConfigError(f"--device {device} pins one GPU; with several, process i uses cuda:i (use auto or cuda)")
    if torch.cuda.device_count() < n:
        raise ConfigError(f"--devices {n}: only {torch.cuda.device_count()} GPU(s) visible on this machine")


def local_device(device: torch.device) -> torch.device:
    """This process's device: the configured one, or cuda:LOCAL_RANK when torchrun started several on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or device.type != "cuda":
        return device
    check_devices(int(os.environ["LOCAL_WORLD_SIZE"]), device)
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group (nccl on GPUs, gloo on CPU) for the block; yields this process's device.

    Without torchrun, or with one process, nothing is set up. A nested use (the FSR estimator's sub-runs
    inside a run) reuses the group, and only the outermost use tears it down.
    """
    device = local_device(device)
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the device of NCCL's object collectives (from_main, gather_rows)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def from_main(fn: Callable[[], T]) -> T:
    """fn() computed by rank 0 alone (e.g. a read of the run directory) and sent to every rank.

    An exception on rank 0 is raised on every rank, so no rank waits for the others forever.
    """
    if world() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as e:
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over the ranks (in place)."""
    if world() > 1:
        dist.all_reduce(values)
    return values


def local_chunk(dataset: Dataset) -> Dataset:
    """This rank's contiguous chunk of an evaluation set, without padding; `gather_rows` undoes the cut."""
    if world() == 1:
        return dataset
    start, stop = shard_bounds(len(dataset), rank(), world())
    return Subset(dataset, range(start, stop))


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (dim 0), concatenated in rank order, on every rank; empty chunks are skipped."""
    if world() == 1:
        return rows
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, rows.cpu())
    return torch.cat([p for p in parts if p.numel()] or parts[:1])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the parameters that require grad now; the model itself when alone.

    Frozen tensors get no hooks and no all-reduce. Build a wrapper per phase, after its tensors were
    unfrozen, and evaluate on the bare model. Buffers are not broadcast (a ViT's are constants, equal on
    every rank). `static_graph` lets a trainable tensor that the forward pass skips (a norm the head
    does not read) go unreduced on every rank alike, without find_unused_parameters' per-step search.
    """
    if world() == 1:
        return model
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, static_graph=True)


class SliceSampler(Sampler[list[int]]):
    """The global batches of `sampler`, each cut to this rank's contiguous slice.

    Every rank draws the same seeded order, so together the ranks see exactly the batches of one
    process. A rank whose slice is empty (a last batch smaller than the world) gets a placeholder,
    ~index, so that it still joins the gradient all-reduce; `Placeholders` labels it IGNORE.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world: int) -> None:
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in BatchSampler(self.sampler, self.batch_size, drop_last=False):
            start, stop = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:stop] or [~batch[0]]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


class Placeholders(Dataset):
    """A dataset of (input, label) pairs that also answers SliceSampler's placeholders ~i with (input i, IGNORE)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index >= 0:
            return self.dataset[index]
        return self.dataset[~index][0], IGNORE


def launch(nproc: int, argv: list[str]) -> int:
    """`python -m lnshift ARGV` as `nproc` processes of this machine under torchrun; returns its exit status.

    --standalone gives the rendezvous a free local port, so several runs can share a machine.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*command, "-m", "lnshift", *argv], check=False).returncode
