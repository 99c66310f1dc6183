"""Worker processes for `lnshift sweep --devices N [--per-device K]`: one GPU and an even share of the
cores each, taking whole units from one queue.

This module imports no torch, so the CLI starts the pool before it loads the heavy modules itself:
the workers import lnshift while the parent does instead of after it, which was most of the extra
start-up of a sweep over 2 GPUs against one (benchmarks/results/README.md, "Data parallelism"). The pool
knows nothing of sweeps: its caller names the modules to preload and sends the function each task runs.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..config import DEVICE_DATA_SHARE, DEVICE_DATA_SHARE_ENV
from ..errors import ConfigError

DIED = "its worker process ended before finishing it"


def worker_count(devices: int, per_device: int) -> int:
    """How many worker processes `--devices` x `--per-device` asks for (1: the sweep runs in-process)."""
    if devices < 1 or per_device < 1:
        raise ConfigError(f"--devices and --per-device must be >= 1, got {devices} and {per_device}")
    return devices * per_device


def worker_threads(workers: int) -> int:
    """CPU threads of each of `workers` processes: an even share of the cores (as torchrun gives)."""
    return max(1, (os.cpu_count() or 1) // workers)


def visible_gpus(devices: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `devices` workers, without importing torch: the GPUs listed in
    the variable, else 0..N-1. None where the machine lists fewer (sweep.check_gpus reports that)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in listed.split(",") if g.strip()] if listed is not None else list(map(str, range(devices)))
    return [gpus[i] if i < len(gpus) else None for i in range(devices)]


@contextlib.contextmanager
def environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, leave alone) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WorkerPool:
    """`per_device` spawned processes on each of `devices` GPUs (CPU workers on a machine without).

    Each starts with one GPU visible and its share of the cores and of the GPU memory the device input
    pipeline may fill: N processes with all-core OpenMP pools oversubscribe the machine many times over.
    Each imports the `preload` modules as it starts, alongside the parent, before its first task arrives.
    """

    def __init__(self, devices: int, per_device: int, preload: Sequence[str] = ()) -> None:
        worker_count(devices, per_device)
        self.devices = devices
        gpus = [gpu for gpu in visible_gpus(devices) for _ in range(per_device)]
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked processes
        self.tasks, self.results = context.Queue(), context.Queue()
        args = (self.tasks, self.results, tuple(preload))
        self.processes = [context.Process(target=_work, args=args) for _ in gpus]
        self.ended = False  # whether every worker has been sent its end of the queue
        shared = {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(worker_threads(len(gpus))),
            DEVICE_DATA_SHARE_ENV: str(DEVICE_DATA_SHARE / per_device),
        }
        for gpu, process in zip(gpus, self.processes, strict=True):
            with environ({**shared, "CUDA_VISIBLE_DEVICES": gpu}):
                process.start()

    def run(
        self, work: Callable[..., str | None], tasks: dict[str, tuple], echo: Callable[[str], None]
    ) -> Iterator[tuple[str, str | None]]:
        """(key, error or None) of every task, in the order the workers finish them.

        Task `key: args` runs as `work(*args, echo)` in a worker and returns its error, if any; `work` is
        a module-level function (sent by name). Workers send their log lines here, so `echo` is called in
        this process only.
        """
        for key, args in tasks.items():
            self.tasks.put((work, key, args))
        for _ in self.processes:  # one None per worker: the end of the queue
            self.tasks.put(None)
        self.ended = True
        left = set(tasks)
        while left:
            try:
                kind, key, text = self.results.get(timeout=1)
            except queue.Empty:
                if any(p.is_alive() for p in self.processes) or not self.results.empty():
                    continue
                break
            if kind == "echo":
                echo(text)
            else:
                left.discard(key)
                yield key, text
        for key in sorted(left):  # a worker died (killed, out of memory) with these tasks taken or queued
            yield key, DIED

    def close(self) -> None:
        """Wait for the workers to exit (they do once the queue is empty); stop any still starting."""
        for process in self.processes:
            if not self.ended:
                process.terminate()
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()


def _work(tasks: Any, results: Any, preload: tuple[str, ...]) -> None:
    """A worker: imports the `preload` modules (alongside the parent's imports), then runs tasks until None."""
    for module in preload:
        importlib.import_module(module)
    for work, key, args in iter(tasks.get, None):
        error = work(*args, lambda text: results.put(("echo", None, text)))
        results.put(("done", key, error))
