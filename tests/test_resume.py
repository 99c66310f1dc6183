"""A run killed with SIGKILL mid-training resumes with --resume and ends exactly like an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from lnshift import rundir as rd
from tiny import TINY

ARGS = [*TINY, "--shots", "6", "--batch-size", "6", "--epochs", "6", "--method", "lp-ln"]
ARGS += ["--test", "sketch=builtin:pacs-mini/sketch"]


def lnshift(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lnshift", "fit", *argv, *ARGS], stdout=subprocess.DEVNULL)


def test_sigkill_during_training_then_resume(tmp_path):
    assert lnshift("--out", str(tmp_path / "whole")).wait() == 0
    cut = tmp_path / "cut"
    proc = lnshift("--out", str(cut))
    checkpoint = cut / rd.CHECKPOINT / "state.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next epoch
    assert proc.poll() is None, "the run finished before it could be killed; give it more epochs"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / rd.DONE).exists() and not (cut / rd.METRICS).exists()
    assert lnshift("--out", str(cut)).wait() != 0  # an unfinished run is not silently overwritten
    assert lnshift("--out", str(cut), "--resume").wait() == 0
    a, b = load_file(tmp_path / "whole" / rd.ADAPTER), load_file(cut / rd.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = rd.RunDir(tmp_path / "whole").read_json(rd.METRICS)
    mb = rd.RunDir(cut).read_json(rd.METRICS)
    assert ma == mb
