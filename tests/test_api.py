"""The public API (lnshift/__init__.py, api.py): what `help(lnshift)` shows, and that a Run's methods give
what the functions behind the commands give."""

import inspect
import pydoc
import subprocess
import sys

import pytest
import torch

import lnshift
from lnshift import rundir as rd
from lnshift.analyses.saved_run import evaluate_run, load_run, rescale_run, shift_of_run
from lnshift.errors import ConfigError, RunDirError
from lnshift.report import write_report

TINY = {
    "model": "lnshift/test-vit",
    "model_kwargs": {"img_size": 32, "patch_size": 8},
    "shots": 2,
    "steps": 3,
    "batch_size": 4,
    "min_epoch_steps": 1,
    "device": "cpu",
    "workers": 0,
    "progress": False,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return lnshift.fit_run(**TINY, out=str(tmp_path_factory.mktemp("api") / "ln"), echo=None)


def test_help_lists_the_api_and_import_stays_light():
    text = pydoc.render_doc(lnshift, renderer=pydoc.plaintext)
    for name in lnshift.__all__:
        assert f"{name}(" in text or f"class {name}" in text, name
        assert "Args:" in inspect.getdoc(getattr(lnshift, name)), f"{name} has no Args section"
    code = "import sys, lnshift; assert 'torch' not in sys.modules; lnshift.FitConfig; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # not even for the config: the CLI starts sweep workers before torch


def test_fit_stays_the_module_and_fit_run_the_function():
    import lnshift.training.fit as fit_module  # the submodule, imported first, does not hide the API function

    assert inspect.ismodule(fit_module) and inspect.isfunction(lnshift.fit_run)
    with pytest.raises(AttributeError):
        lnshift.no_such_name  # noqa: B018


def test_fit_run_takes_a_config_or_options(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        lnshift.fit_run(lnshift.FitConfig(), steps=1)
    with pytest.raises(ConfigError, match="unknown option"):
        lnshift.fit_run(stepz=1)
    with pytest.raises(RunDirError, match="not found"):
        lnshift.load_run(tmp_path / "missing")


def test_run_methods_give_what_the_functions_give(run, tmp_path):
    assert run.metrics == rd.RunDir(run.path).read_json(rd.METRICS)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(run.model(x), load_run(run.path).model(x), rtol=0, atol=0)
    assert run.shift(write=False).to_dict() == shift_of_run(run.path, write=False).to_dict()
    tests = {"cartoon": "builtin:pacs-mini/cartoon"}
    assert run.evaluate(tests, progress=False) == evaluate_run(run.path, tests, device="cpu", progress=False)
    scaled = run.rescale(1.5, out=tmp_path / "x1.5", progress=False)
    expected = rescale_run(run, "1.5", out=tmp_path / "expected", device="cpu", progress=False)  # a Run is a path
    assert scaled.metrics == expected["metrics"] and scaled.lambda_choice["lambda"] == expected["lambda"] == 1.5
    assert scaled.report() == write_report(scaled.path) == scaled.path / "report.html"


def test_rescale_in_place_reloads_the_model(run):
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert run.rescale(0, progress=False) is run
    after = run.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".norm" in k for k in changed)  # lambda 0: the LayerNorms back at pretrained
    saved = load_run(run.path)
    assert all(torch.equal(after[k], saved.base[k]) for k in changed if k in saved.base)
    run.rescale(1, progress=False)  # the fine-tuned values again, for the other tests
