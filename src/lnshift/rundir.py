"""The run directory: the contract between training, evaluation, shift/FSR, merging and reports.

Every file is written atomically (temporary file in the same folder, fsync, rename), and `DONE` is
written last, so a run directory never looks complete when it is not. In a data-parallel run every
process runs the same code, but only rank 0 writes: the writes here are no-ops on the other ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import ConfigError, RunDirError
from .training.distributed import is_main

CONFIG = "config.yaml"
SPLITS = "splits.json"
BASE = "base.safetensors"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.json"
SHIFT = "shift.json"
LAMBDA = "lambda.json"
FINETUNED = "finetuned.safetensors"  # tuned values before lambda rescaling, when a lambda was applied
FSR = "fsr.json"
FSR_ESTIMATE = "fsr_estimate.json"
CYCLES = "cycles.json"
EVENTS = "events.jsonl"
LOG = "train.log"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = f"{CHECKPOINT}/state.safetensors"  # resume state: tensors + JSON metadata, nothing unpickled
DONE = "DONE"
FAILED = "FAILED"  # a run that diverged (a search records it as a failed candidate): the error, one line
# all that a run writes before its first checkpoint
STARTUP_FILES = {CONFIG, EVENTS, LOG, SPLITS, BASE, CHECKPOINT, "tensorboard"}

# every train.log line is also a record here (INFO, with the run directory as `record.run`): library
# users route or silence lnshift's output with the logging configuration; train.log does not depend on it
logger = logging.getLogger("lnshift")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`; a crash leaves the old file or none, never half of one.

    The file gets the permissions a plain write would give it (mkstemp's are 0600, which would keep
    reports and results from the other users of a shared machine).
    """
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = plain_write_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def plain_write_mode(path: Path) -> int:
    """The mode `open(path, "w")` leaves: an existing file keeps its own, a new one gets 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Safetensors with JSON-encoded metadata values (safetensors metadata must be str -> str)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, default=_json_default) for k, v in metadata.items()}
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(clean, str(p), metadata=meta))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


class RunDir:
    """Paths and readers for one run; creation policy (refuse, resume, overwrite) lives in `prepare`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> bool:
        return (self.path / DONE).is_file()

    def never_trained(self) -> bool:
        """An unfinished run with nothing to resume: it stopped before its first checkpoint (a typo'd path, say)."""
        if self.done or (self.path / CHECKPOINT_STATE).exists():
            return False
        return all(p.name in STARTUP_FILES or p.name.endswith(".tmp") for p in self.path.iterdir())

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to write into an existing run unless the user said --resume or --overwrite.

        A run that stopped before training started holds nothing to resume: a new run replaces it.
        """
        if self.path.exists() and any(self.path.iterdir()):
            if overwrite or (not resume and self.never_trained()):
                shutil.rmtree(self.path)
            elif self.done:
                state = "holds a finished run, nothing to resume" if resume else "already holds a finished run"
                prefix = "--resume: " if resume else ""
                raise RunDirError(
                    f"{prefix}{self.path} {state}; pass --overwrite to replace it or choose another --out"
                )
            elif not resume:
                raise RunDirError(
                    f"{self.path} already holds an unfinished run; pass --resume to continue it or --overwrite "
                    "to replace it"
                )
        elif resume:
            raise RunDirError(f"--resume: {self.path} holds no run to resume")
        self.path.mkdir(parents=True, exist_ok=True)

    def require(self, *names: str) -> None:
        if not self.path.is_dir():
            raise RunDirError(f"run directory not found: {self.path}")
        missing = [n for n in names if not (self.path / n).exists()]
        if missing:
            hint = "" if self.done else " (the run has no DONE marker: it did not finish; rerun it with --resume)"
            raise RunDirError(f"{self.path}: missing {', '.join(missing)}{hint}")

    def read_json(self, name: str) -> Any:
        self.require(name)
        return json.loads((self.path / name).read_text())

    def read_config(self) -> dict[str, Any]:
        self.require(CONFIG)
        return yaml.safe_load((self.path / CONFIG).read_text())

    def read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and decoded metadata of a safetensors artifact."""
        from safetensors import safe_open

        self.require(name)
        path = str(self.path / name)
        with safe_open(path, framework="pt") as fh:
            raw = fh.metadata() or {}
        meta = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
        return load_file(path), meta

    def mark_done(self) -> None:
        """Finish the run: its resume state goes (a finished run has nothing to resume), then DONE."""
        if is_main():
            (self.path / CHECKPOINT_STATE).unlink(missing_ok=True)
        write_text(self.path / DONE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


class EventLog:
    """Append-only `events.jsonl` (one JSON object a line), a human-readable `train.log`, and optionally
    TensorBoard scalars (RUN_DIR/tensorboard/) of every numeric field of the epoch events."""

    def __init__(self, run: RunDir, echo: Callable[[str], None] | None = None, tensorboard: bool = False) -> None:
        self.events = run / EVENTS
        self.text = run / LOG
        self.run = str(run.path)
        self.enabled = is_main()  # one log per run, kept by rank 0
        self.echo = echo
        self.writer = None
        self._phase: str | None = None
        self._phase_start = self._global_step = 0
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))

    def event(self, kind: str, **data: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": kind, **data}
        with open(self.events, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
        if self.writer is not None and "step" in data:
            phase = data.get("phase")
            if phase != self._phase:  # phases count steps from 0; TensorBoard gets one global step
                self._phase, self._phase_start = phase, self._global_step
            self._global_step = self._phase_start + int(data["step"])
            for key, value in data.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, self._global_step)
            self.writer.flush()

    def info(self, message: str) -> None:
        """A line of train.log, a record of the `lnshift` logger and, with `echo` (the CLI's print), the console."""
        if not self.enabled:
            return
        with open(self.text, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        logger.info(message, extra={"run": self.run})
        if self.echo:
            self.echo(message)
