"""End to end through the `lnshift` command on a tiny model and the built-in real PACS images."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lnshift import rundir as rd
from lnshift.analyses.saved_run import load_run
from lnshift.backbones import load_backbone
from lnshift.cli import main
from lnshift.config import FitConfig
from lnshift.data import ImageDataset, make_transform, open_source
from lnshift.data.builtin import resolve_spec
from lnshift.data.device import to_device
from lnshift.training.evaluate import predict, resolve_device
from lnshift.training.ingredients import loader
from lnshift.training.phases import BUDGETS
from tiny import TINY

DATA = ["--shots", "4", "--test", "photo=builtin:pacs-mini/photo-test", "--test", "sketch=builtin:pacs-mini/sketch"]


def fit(out, *extra):
    return main(["fit", "--out", str(out), *TINY, *DATA, "--epochs", "2", "--batch-size", "8", *extra])


@pytest.fixture(scope="module")
def ln_run(tmp_path_factory, device):
    """One `ln` run that most tests here read; under `pytest --gpu` it trains on the GPU."""
    out = tmp_path_factory.mktemp("runs") / "ln"
    assert fit(out, "--method", "ln", "--device", device) == 0
    return out


def test_run_directory_contract(ln_run):
    for name in (rd.CONFIG, rd.SPLITS, rd.BASE, rd.ADAPTER, rd.METRICS, rd.CYCLES, rd.EVENTS, rd.LOG, rd.DONE):
        assert (ln_run / name).is_file(), name
    metrics = json.loads((ln_run / rd.METRICS).read_text())
    assert set(metrics["test"]) == {"photo", "sketch"}
    for m in [metrics["val"], *metrics["test"].values()]:
        assert {"accuracy", "balanced_accuracy", "macro_f1", "ece"} <= set(m)
    splits = json.loads((ln_run / rd.SPLITS).read_text())
    assert all(n == 4 for n in splits["splits"]["train"]["counts"].values())  # 4 shots x 7 classes
    assert not set(splits["splits"]["train"]["indices"]) & set(splits["splits"]["val"]["indices"])
    config = (ln_run / rd.CONFIG).read_text()
    assert "torch:" in config and "timm:" in config and "seed: 0" in config
    # what `auto` became: on the CPU no fast path (timm's forward) and the workers input pipeline
    assert yaml.safe_load(config)["resolved"] == {"fast_paths": [], "input_pipeline": "workers"}
    assert not (ln_run / rd.CHECKPOINT_STATE).exists()


def test_adapter_holds_only_layernorms_and_head(ln_run):
    adapter = load_file(ln_run / rd.ADAPTER)
    base = load_file(ln_run / rd.BASE)
    assert set(adapter) == set(base)
    assert all(k.startswith("head.") or ".norm" in k for k in adapter)
    assert sum(v.numel() for v in adapter.values()) < 5000
    changed = [k for k in adapter if not torch.equal(adapter[k], base[k])]
    assert any(".norm" in k for k in changed) and any(k.startswith("head.") for k in changed)


def test_loaded_run_reproduces_saved_validation_metrics(ln_run):
    """On the run's own device and precision, bit for bit."""
    saved = load_run(ln_run)
    device = resolve_device(saved.cfg.runtime.device)
    splits = json.loads((ln_run / rd.SPLITS).read_text())
    val = splits["splits"]["val"]
    source = open_source(resolve_spec(val["source"]))
    data_config = saved.model.backbone.data_config
    ds = ImageDataset(source, val["indices"], splits["class_to_idx"], make_transform(data_config, train=False))
    if "input pipeline: device" in (ln_run / rd.LOG).read_text():  # as the run scored it: normalised on the GPU
        ds = to_device(ds, data_config, device, crops=False)
    logits, labels = predict(
        saved.model.to(device), loader(ds, saved.cfg, train=False), device, saved.cfg.optim.precision
    )
    metrics = json.loads((ln_run / rd.METRICS).read_text())["val"]
    assert float(np.mean(logits.argmax(1) == labels)) == metrics["accuracy"]
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert loss == pytest.approx(metrics["loss"], abs=1e-6)
    again, _ = predict(
        load_run(ln_run).model.to(device), loader(ds, saved.cfg, train=False), device, saved.cfg.optim.precision
    )
    assert np.array_equal(logits, again)


def test_merge_gives_a_plain_timm_state_dict(ln_run, tmp_path):
    """Plain timm rebuilds the model from the file's metadata alone."""
    import timm
    from safetensors import safe_open

    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(ln_run), "--out", str(out)]) == 0
    state = load_file(out)
    with safe_open(out, "pt") as fh:
        meta = fh.metadata()
    model = timm.create_model(meta["timm.architecture"], **json.loads(meta["timm.kwargs"]))
    model.load_state_dict(state)  # strict: names and shapes are timm's own
    assert json.loads(meta["lnshift.classes"]) == load_run(ln_run).classes
    assert json.loads(meta["lnshift.data_config"])["input_size"] == [3, 32, 32]
    saved = load_run(ln_run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), saved.model(x), atol=1e-6)


def test_eval_adds_a_test_set(ln_run, capsys):
    assert main(["eval", str(ln_run), "--test", "cartoon=builtin:pacs-mini/cartoon", "--device", "cpu"]) == 0
    metrics = json.loads((ln_run / rd.METRICS).read_text())
    assert metrics["test"]["cartoon"]["n"] == 140 and "photo" in metrics["test"]
    assert "cartoon: accuracy" in capsys.readouterr().out


def test_existing_run_is_refused_with_a_clear_error(ln_run, capsys):
    assert fit(ln_run) == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err


@pytest.mark.parametrize("fast_paths", ["auto", "all"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, fast_paths):
    """Also with other fast paths on resume (runtime options: they change float rounding only)."""
    import lnshift.training.loop as loop

    assert fit(tmp_path / "whole", "--method", "lp-ln") == 0
    calls = {"n": 0}
    real = loop.run_phase

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # killed when the second phase starts, after the first one finished
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("lnshift.training.fit.run_phase", interrupted)
    assert fit(tmp_path / "cut", "--method", "lp-ln") == 130
    assert not (tmp_path / "cut" / rd.DONE).exists()
    monkeypatch.setattr("lnshift.training.fit.run_phase", real)
    assert fit(tmp_path / "cut", "--method", "lp-ln", "--resume", "--fast-paths", fast_paths) == 0
    a, b = load_file(tmp_path / "whole" / rd.ADAPTER), load_file(tmp_path / "cut" / rd.ADAPTER)
    assert a.keys() == b.keys()
    tolerance = 0 if fast_paths == "auto" else 1e-5
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tolerance, atol=tolerance, msg=k)
    resolved = yaml.safe_load((tmp_path / "cut" / rd.CONFIG).read_text())["resolved"]
    assert resolved["fast_paths"] == ([] if fast_paths == "auto" else ["patch_matmul", "table_gelu", "class_token"])


@pytest.mark.parametrize("method", ["lp", "bitfit", "lora", "cyclic", "full"])
def test_every_method_runs(tmp_path, method):
    assert fit(tmp_path / method, "--method", method, "--epochs", "4") == 0
    phases = json.loads((tmp_path / method / rd.CYCLES).read_text())["phases"]
    assert len(phases) == (4 if method == "cyclic" else 1)


def test_cyclic_kx_gives_every_phase_the_whole_budget(tmp_path):
    """cyclic shares --steps over its 2K phases; cyclic-kx (the paper's budget) trains all of it in each, lambda too."""
    assert fit(tmp_path / "cyclic", "--method", "cyclic", "--steps", "8") == 0
    kx = ["--method", "cyclic-kx", "--steps", "8", "--lambda", "auto", "--lambda-each-cycle"]
    assert fit(tmp_path / "kx", *kx) == 0
    shared, full = (json.loads((tmp_path / name / rd.CYCLES).read_text()) for name in ("cyclic", "kx"))
    assert [p["steps"] for p in shared["phases"]] == [2] * 4 and shared["budget"]["steps"] == 8
    assert [p["steps"] for p in full["phases"]] == [8] * 4
    assert full["budget"] == {"rule": BUDGETS["cyclic-kx"], "budget_steps": 8, "factor": 4, "steps": 32}
    assert [("lambda" in p) for p in full["phases"]] == [False, True] * 2


def test_inspect_lists_layernorms(capsys):
    assert main(["inspect", "--model", "test_vit"]) == 0
    out = capsys.readouterr().out
    assert "model.blocks.0.norm1" in out and "trainable LayerNorm values" in out


def test_inspect_defaults_to_fit_s_model_and_shows_its_training_preprocessing(capsys):
    """The architecture only, but the preprocessing that training uses: the one stored with the weights."""
    assert main(["inspect", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["data_config"]
    used = load_backbone(FitConfig().model.name).data_config
    assert shown == json.loads(json.dumps(used)) and shown["crop_pct"] == 1.0 and shown["mean"][0] != 0.5


def test_help_of_every_command():
    out = subprocess.run([sys.executable, "-m", "lnshift", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("fit", "eval", "merge", "inspect"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["fit", "eval", "merge", "inspect"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: lnshift " + cmd in capsys.readouterr().out


def test_shift_command_writes_the_documented_json(ln_run, capsys):
    assert main(["shift", str(ln_run)]) == 0
    shift = json.loads((ln_run / rd.SHIFT).read_text())
    assert set(shift) == {"layers", "shift_gamma", "shift_beta", "shift_ln"}
    assert shift["shift_ln"] == pytest.approx(shift["shift_gamma"] + shift["shift_beta"])
    assert shift["shift_gamma"] > 0 and "total" in capsys.readouterr().out


def test_rescale_identities_and_reversibility(ln_run, tmp_path):
    base, tuned = load_file(ln_run / rd.BASE), load_file(ln_run / rd.ADAPTER)
    norm_keys = [k for k in tuned if ".norm" in k and k.endswith(".weight")]
    assert main(["rescale", str(ln_run), "--lambda", "0", "--out", str(tmp_path / "zero")]) == 0
    zero = load_file(tmp_path / "zero" / rd.ADAPTER)
    assert all(torch.equal(zero[k], base[k]) for k in norm_keys)  # lambda 0 = pretrained LayerNorm gammas
    assert any(not torch.equal(zero[k], base[k]) for k in tuned if k.endswith(".bias") and ".norm" in k)  # beta kept
    # rescaling a rescaled run starts again from the fine-tuned values: lambda 1 restores them exactly
    assert main(["rescale", str(tmp_path / "zero"), "--lambda", "1"]) == 0
    back = load_file(tmp_path / "zero" / rd.ADAPTER)
    assert all(torch.equal(back[k], tuned[k]) for k in tuned)
    assert main(["rescale", str(ln_run), "--lambda", "2", "--target", "both", "--out", str(tmp_path / "two")]) == 0
    two = load_file(tmp_path / "two" / rd.ADAPTER)
    k = norm_keys[0]
    assert torch.allclose(two[k], base[k] + 2 * (tuned[k] - base[k]), atol=1e-6)
    lam = json.loads((tmp_path / "two" / rd.LAMBDA).read_text())
    assert lam["lambda"] == 2.0 and lam["selected_on"] == "given" and (tmp_path / "two" / rd.DONE).exists()


def test_rescale_auto_selects_on_validation_only(ln_run, tmp_path, monkeypatch):
    import lnshift.analyses.saved_run as sr

    seen = []
    real = sr.select_lambda

    def spy(model, norms, base, tuned, dataset, *args, **kwargs):
        seen.append(dataset.split)
        return real(model, norms, base, tuned, dataset, *args, **kwargs)

    monkeypatch.setattr(sr, "select_lambda", spy)
    assert main(["rescale", str(ln_run), "--lambda", "auto", "--grid", "0,1,2", "--out", str(tmp_path / "a")]) == 0
    assert seen == ["val"]
    lam = json.loads((tmp_path / "a" / rd.LAMBDA).read_text())
    assert lam["selected_on"] == "val" and lam["lambda"] in (0, 1, 2)


def test_rescale_by_a_given_lambda_scores_no_grid_unless_asked(ln_run, tmp_path, monkeypatch, capsys):
    import lnshift.analyses.saved_run as sr

    calls = []
    real = sr.select_lambda
    monkeypatch.setattr(sr, "select_lambda", lambda *a, **k: calls.append(k["grid"]) or real(*a, **k))
    assert main(["rescale", str(ln_run), "--lambda", "1.5", "--out", str(tmp_path / "x1.5")]) == 0
    assert calls == [] and "curve" not in json.loads((tmp_path / "x1.5" / rd.LAMBDA).read_text())
    out = capsys.readouterr().out
    assert "lambda 1.5 (given): val" in out and "best on validation" not in out
    assert main(["rescale", str(ln_run), "--lambda", "1.5", "--grid", "0,1", "--out", str(tmp_path / "no")]) == 2
    assert "--score-grid" in capsys.readouterr().err


def test_rescale_table_tells_the_given_lambda_from_the_best_on_validation(ln_run, tmp_path, capsys):
    args = ["rescale", str(ln_run), "--lambda", "1", "--score-grid", "--grid", "0,1,3", "--out", str(tmp_path / "x1")]
    assert main(args) == 0
    record = json.loads((tmp_path / "x1" / rd.LAMBDA).read_text())
    assert record["lambda"] == 1 and record["selected_on"] == "given" and len(record["curve"]) == 3
    rows = {float(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:4]}
    assert "<- given" in rows[1.0]
    assert "best on validation" in rows[record["best_on_validation"]]
    assert sum("best on validation" in line for line in rows.values()) == 1


def test_fsr_oracle_between_runs(ln_run, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert fit(ref, "--method", "ln", "--shots", "8", "--steps", "8") == 0  # more data, the same 8 steps
    assert main(["fsr", str(ln_run), "--reference", str(ref)]) == 0
    fsr = json.loads((ln_run / rd.FSR).read_text())
    s_run, s_ref = (json.loads((r / rd.SHIFT).read_text()) for r in (ln_run, ref))
    assert fsr["fsr_gamma"] == pytest.approx(s_run["shift_gamma"] / s_ref["shift_gamma"])
    assert fsr["fsr_gamma"] != pytest.approx(1.0)
    assert fsr["budget"]["run_steps"] == fsr["budget"]["reference_steps"] == 8 and not fsr["warnings"]
    assert "fsr" in capsys.readouterr().out


def test_tensorboard_logs_losses_lr_and_validation(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert fit(tmp_path / "tb", "--method", "lp-ln", "--tensorboard") == 0
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "lr", "val_accuracy", "val_loss"} <= tags
    steps = [e.step for e in acc.Scalars("train_loss")]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) == 2  # one global step axis over both phases
