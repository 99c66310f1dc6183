"""`lnshift export --peft`: peft's own loader rebuilds lnshift's tuned model from the plain timm model."""

import json

import pytest
import timm
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lnshift import rundir as rd
from lnshift.analyses.export import INFO, base_timm_model
from lnshift.analyses.saved_run import load_run
from lnshift.cli import main
from tiny import TINY, same_outputs


def fit(out, *extra):
    return main(["fit", "--out", str(out), *TINY, "--shots", "2", "--steps", "3", "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def ln_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ln"
    assert fit(out, "--method", "ln", "--device", "cpu") == 0
    return out


@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # peft's, for every norm it loads
def test_peft_loads_the_same_model_as_lnshift(ln_run, tmp_path):
    out = tmp_path / "peft"
    assert main(["export", str(ln_run), "--peft", str(out)]) == 0
    x = torch.randn(4, 3, 32, 32)
    timm_model = base_timm_model(ln_run)
    with torch.no_grad():
        before = timm_model(x)
        loaded = PeftModel.from_pretrained(timm_model, out).eval()
        expected = load_run(ln_run).model(x)
        same_outputs(loaded(x), expected)
    assert not torch.allclose(before, expected, atol=1e-3)  # the adapter, not the base model, made them equal


def test_base_model_holds_the_values_before_training(ln_run):
    """What PEFT starts from: the run's base values, which training changed (else the round trip proves nothing)."""
    base, tuned = load_file(ln_run / rd.BASE), load_file(ln_run / rd.ADAPTER)
    state = base_timm_model(ln_run).state_dict()
    norms = [k for k in base if not k.startswith("head.")]
    assert norms and any(not torch.equal(base[k], tuned[k]) for k in norms)
    for key in norms:
        torch.testing.assert_close(state[key.removeprefix("backbone.model.")], base[key], rtol=0, atol=0)


def test_adapter_folder_holds_norms_head_and_how_to_build_the_timm_model(ln_run, tmp_path):
    out = tmp_path / "peft"
    assert main(["export", str(ln_run), "--peft", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["modules_to_save"] == ["head"]
    tensors = load_file(out / "adapter_model.safetensors")
    n_norms = len([k for k in load_file(ln_run / rd.ADAPTER) if not k.startswith("head.")])
    assert len(tensors) == n_norms + 2 and {"base_model.model.head.weight", "base_model.model.head.bias"} < set(tensors)
    info = json.loads((out / INFO).read_text())
    assert info["classes"] == load_run(ln_run).classes and info["data_config"]["input_size"] == [3, 32, 32]
    rebuilt = timm.create_model(info["timm.architecture"], **info["timm.kwargs"]).state_dict()
    plain = base_timm_model(ln_run).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in plain.items()}


def test_an_existing_folder_is_refused(ln_run, tmp_path, capsys):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "notes.txt").write_text("mine")
    assert main(["export", str(ln_run), "--peft", str(tmp_path / "peft")]) == 2
    assert "--peft" in capsys.readouterr().err and (tmp_path / "peft" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--method", "lora"], "--method 'lora' tuned tensors that are neither norms nor the head"),
        (["--method", "lp"], "--method 'lp' tuned no LayerNorm"),
        (["--method", "ln", "--head", "mlp"], "--head linear only, not --head 'mlp'"),
    ],
)
def test_what_peft_ln_tuning_cannot_hold_is_refused(options, named, tmp_path, capsys):
    assert fit(tmp_path / "run", *options) == 0
    assert main(["export", str(tmp_path / "run"), "--peft", str(tmp_path / "peft")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()
