"""A run killed with SIGKILL mid-training resumes with --resume and ends exactly like an uninterrupted run."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lnshift import pipeline
from lnshift import rundir as rd
from lnshift.config import FitConfig
from lnshift.training import fit as fit_module
from lnshift.training.fit import load_resume_state, save_resume_state
from lnshift.training.loop import PhaseState
from tiny import TINY

ARGS = [*TINY, "--shots", "6", "--batch-size", "6", "--epochs", "6", "--method", "lp-ln"]
ARGS += ["--test", "sketch=builtin:pacs-mini/sketch"]


def lnshift(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lnshift", "fit", *argv, *ARGS], stdout=subprocess.DEVNULL)


def test_sigkill_during_training_then_resume(tmp_path):
    assert lnshift("--out", str(tmp_path / "whole")).wait() == 0
    cut = tmp_path / "cut"
    proc = lnshift("--out", str(cut))
    checkpoint = cut / rd.CHECKPOINT_STATE
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


def test_a_run_interrupted_in_its_final_lambda_resumes_without_training_again(tmp_path, monkeypatch):
    """Training leaves a run with a final lambda open (checkpoint kept, no metrics, no DONE); --resume goes on
    to the lambda and ends as an uninterrupted run."""
    options = {"model": "lnshift/test-vit", "model_kwargs": {"img_size": 32, "patch_size": 8}, "method": "lp-ln"}
    options |= {"shots": 4, "steps": 4, "batch_size": 8, "min_epoch_steps": 1, "workers": 0, "progress": False}
    options |= {"test": {"sketch": "builtin:pacs-mini/sketch"}, "lam": "auto", "lambda_grid": "0,1,2"}
    whole = pipeline.fit(FitConfig.from_dict({**options, "out": str(tmp_path / "whole")}), echo=None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    cut = FitConfig.from_dict({**options, "out": str(tmp_path / "cut")})
    monkeypatch.setattr(pipeline, "rescale_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.fit(cut, echo=None)
    run = rd.RunDir(cut.runtime.out)
    assert (run / rd.ADAPTER).exists() and (run / rd.CHECKPOINT_STATE).exists()
    assert not (run / rd.METRICS).exists() and not run.done
    monkeypatch.undo()
    phases = []
    real = fit_module.run_phase
    monkeypatch.setattr(fit_module, "run_phase", lambda *a, **k: phases.append(a[1]) or real(*a, **k))
    pipeline.fit(cut.replace(resume=True), echo=None)
    assert phases == [] and run.done and not (run / rd.CHECKPOINT_STATE).exists()  # nothing trained again
    for name in (rd.ADAPTER, rd.FINETUNED):
        a, b = load_file(whole / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in (rd.METRICS, rd.SHIFT, rd.CYCLES):
        assert whole.read_json(name) == run.read_json(name), name
    assert whole.read_json(rd.LAMBDA)["curve"] == run.read_json(rd.LAMBDA)["curve"]


def adamw_pair(seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    """Two parameters in two groups (as param_groups makes them), after two AdamW steps."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 3))]
    opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.0}, {"params": params[1:], "weight_decay": 0.1}])
    for _ in range(2):
        step(params, opt)
    return params, opt


def step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    (params[0].square().sum() + params[1].sin().sum()).backward()
    opt.step()


def test_checkpoint_is_safetensors_and_json_and_resumes_the_optimizer(tmp_path):
    """The resume state loads with no unpickling, and AdamW continues from it exactly as without the break."""
    params, opt = adamw_pair()
    state = PhaseState(
        epoch=2,
        step=7,
        best_score=(0.5, -math.inf),
        best_epoch=1,
        best_tensors={"head.weight": params[1].detach().clone()},
        history=[{"phase": "a", "epoch": 1, "val_accuracy": 0.5}],
        optimizer=opt.state_dict(),
    )
    run = rd.RunDir(tmp_path)
    trained = {"norm.weight": params[0].detach().clone()}
    save_resume_state(run, trained, [{"phase": "lp", "history": []}], state)
    assert [p.name for p in (tmp_path / rd.CHECKPOINT).iterdir()] == ["state.safetensors"]  # no pickle written
    tensors, done, loaded = load_resume_state(run)
    assert done == [{"phase": "lp", "history": []}] and tensors.keys() == trained.keys()
    assert torch.equal(tensors["norm.weight"], trained["norm.weight"])
    assert (loaded.epoch, loaded.step, loaded.best_score, loaded.best_epoch) == (2, 7, (0.5, -math.inf), 1)
    assert loaded.history == state.history and torch.equal(loaded.best_tensors["head.weight"], params[1].detach())

    again, resumed = adamw_pair(seed=1)  # other values, then everything restored from the checkpoint
    with torch.no_grad():
        for p, q in zip(again, params, strict=True):
            p.copy_(q)
    resumed.load_state_dict(loaded.optimizer)
    step(params, opt)
    step(again, resumed)
    assert all(torch.equal(p, q) for p, q in zip(params, again, strict=True))

    save_resume_state(run, trained, [], None)  # between phases: no phase state
    assert load_resume_state(run)[2] is None
