"""Config file, CLI options and validation agree; bad values name the option; config.yaml by section, old ones too."""

import argparse
import inspect
import json
from typing import get_args

import pytest
import yaml

from lnshift import rundir as rd
from lnshift.cli import main
from lnshift.config import (
    BUILTIN_TESTS,
    OPTIONS,
    SEARCHABLE,
    SELECT_METRICS,
    FitConfig,
    add_fit_options,
    config_from_args,
)
from lnshift.config.sections import Augment, Head, field_types
from lnshift.errors import ConfigError, RunDirError
from lnshift.training.fit import check_resume
from tiny import TINY

# options off their defaults in every section, the strategies' too
CHANGED = {
    "model": "lnshift/test-vit",
    "model_kwargs": {"img_size": 32, "patch_size": 8},
    "train": "my/train",
    "test": {"a": "x"},
    "val_size": "match",
    "shots": 3,
    "method": "cyclic",
    "cycles": 3,
    "lora_dropout": 0.25,
    "lam": "auto",
    "lambda_target": "both",
    "lr": 0.01,
    "search": {"weight_decay": [0, 0.05]},
    "precision": "bf16",
    "frozen_dtype": "bf16",
    "fast_paths": "off",
    "out": "runs/x",
}
# `lnshift fit --out runs/old TINY --shots 2 --steps 4 --batch-size 4 --method lp-ln`: its config.yaml `fit:` as
# lnshift wrote it before the options had sections (flat; no lora_dropout)
BEFORE_SECTIONS = """
model: lnshift/test-vit
weights: null
pretrained: true
model_kwargs: {img_size: 32, patch_size: 8}
train: builtin:pacs-mini/photo
val: null
test: {photo: 'builtin:pacs-mini/photo-test', sketch: 'builtin:pacs-mini/sketch'}
data_root: null
fraction: null
shots: 2
val_fraction: 0.2
val_size: holdout
test_fraction: null
augment: default
skip_bad_images: false
method: lp-ln
cycles: 2
head: linear
head_hidden: 0
include_rms: false
include_layerscale: false
lora_rank: 8
lora_alpha: 16.0
lam: null
lambda_target: gamma
lambda_grid: 0.0,0.25,0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.25,2.5,2.75,3.0
lambda_each_cycle: false
fsr_subsets: 0.25,0.5,0.75
fsr_seeds: 2
subset: null
subset_seed: 0
epochs: 10
steps: 4
batch_size: 4
min_epoch_steps: 1
lr: 0.03
weight_decay: 0.05
decay_1d: false
warmup: 0.1
label_smoothing: 0.0
select: best
search: {}
select_metric: accuracy
seed: 0
device: auto
devices: 1
precision: auto
frozen_dtype: fp32
workers: 0
input_pipeline: auto
compile: false
fast_paths: auto
eval_batch_size: 256
out: runs/old
resume: false
overwrite: false
progress: false
tensorboard: false
"""
OLD_ARGS = [*TINY, "--shots", "2", "--steps", "4", "--batch-size", "4", "--method", "lp-ln"]


def parse(argv):
    p = argparse.ArgumentParser()
    add_fit_options(p)
    return config_from_args(p.parse_args(argv))


def run_with_config(tmp_path, fit: dict) -> rd.RunDir:
    run = rd.RunDir(tmp_path / "run")
    run.prepare(resume=False, overwrite=False)
    rd.write_yaml(run / rd.CONFIG, {"fit": fit})
    return run


def test_cli_overrides_yaml(tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("method: lp\nlr: 0.01\nepochs: 3\ntest: {a: x}\n")
    cfg = parse(["--config", str(cfg_file), "--lr", "0.5", "--test", "b=y", "--include-rms"])
    assert cfg.method.name == "lp" and cfg.optim.epochs == 3 and cfg.optim.lr == 0.5
    assert cfg.data.test == {"b": "y"} and cfg.method.strategy.include_rms is True


def test_flags_keep_their_spellings():
    cfg = parse(
        ["--val-fraction", "0.3", "--lambda", "auto", "--compile", "--progress", "false", "--search", "{lr: auto}"]
    )
    assert cfg.data.val_fraction == 0.3 and cfg.method.lam == "auto"
    assert cfg.runtime.compile is True and cfg.runtime.progress is False and cfg.optim.search["lr"]
    cfg = parse(["--model-kwargs", "{img_size: 64}", "--test", "a=x", "--test", "b=y", "--lr", "1e-2"])
    assert cfg.model.kwargs == {"img_size": 64} and cfg.data.test == {"a": "x", "b": "y"} and cfg.optim.lr == 0.01


def test_help_lists_every_option_with_its_help_and_default():
    p = argparse.ArgumentParser()
    add_fit_options(p)
    text = p.format_help()
    flags = [option.flag for option in OPTIONS.values()]
    starts = [text.index(f"\n  {flag} ") for flag in flags]  # in this order, each on a line of its own
    assert starts == sorted(starts) and "--lora-dropout" in flags
    for option, start, end in zip(OPTIONS.values(), starts, [*starts[1:], len(text)], strict=True):
        entry = " ".join(text[start:end].split())
        assert "default:" in entry, option.flag
        assert " ".join(option.help.split()[:4]) in entry, option.flag
    for section in ("model", "data", "method", "optim", "runtime"):
        assert f"{section} options:" in text


def test_help_of_fitconfig_has_an_args_line_per_option():
    doc = inspect.getdoc(FitConfig)
    args = doc[doc.index("Args:") :]
    for name, option in OPTIONS.items():
        assert f"\n    {name}: " in args and ".".join(option.path) in args, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "x"}, "--method"),
        ({"fraction": 0.5, "shots": 2}, "--fraction and --shots"),
        ({"fraction": 1.5}, "--fraction"),
        ({"val_fraction": 0}, "--val-fraction"),
        ({"val_size": "small"}, "--val-size must be holdout or match, got 'small'"),
        ({"epochs": 0}, "--epochs"),
        ({"resume": True, "overwrite": True}, "--resume"),
        ({"lam": "big"}, "--lambda"),
        ({"lam": "auto", "method": "lp"}, "--method lp"),
        ({"lambda_target": "alpha"}, "--lambda-target"),
        ({"lora_dropout": 1.0}, "--lora-dropout"),
    ],
)
def test_validation_names_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FitConfig.from_dict(kwargs)


def test_a_closed_choice_rejects_other_values_naming_the_option(capsys):
    with pytest.raises(ConfigError, match="--augment must be default, none or strong, got 'bogus'"):
        FitConfig.from_dict({"augment": "bogus"})
    with pytest.raises(ConfigError, match="--head must be linear, mlp or attention, got 'cnn'"):
        FitConfig.from_dict({"method": {"head": "cnn"}})
    with pytest.raises(SystemExit):
        parse(["--precision", "bf17"])
    assert "--precision" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fit", "--augment", "bogus"])
    assert e.value.code == 2 and "argument --augment: invalid choice: 'bogus'" in capsys.readouterr().err


def test_closed_choices_are_the_librarys_names():
    from lnshift.data import AUGMENTS
    from lnshift.training.heads import HEADS
    from lnshift.training.phases import phases_for

    assert set(get_args(Head)) == set(HEADS) and get_args(OPTIONS["select_metric"].type) == tuple(SELECT_METRICS)
    assert all(phases_for(method) for method in get_args(OPTIONS["method"].type))
    assert get_args(Augment) == AUGMENTS and set(SEARCHABLE) <= set(OPTIONS)


def test_option_names_are_unique_across_sections():
    from dataclasses import is_dataclass

    def leaves(cls):
        return sum(leaves(kind) if is_dataclass(kind) else 1 for kind in field_types(cls).values())

    assert leaves(FitConfig) == len(OPTIONS) == len({o.flag for o in OPTIONS.values()})


def test_sections_round_trip_through_yaml_flat_or_by_section(tmp_path):
    cfg = FitConfig.from_dict(CHANGED)
    assert cfg.optim.lr == 0.01 and cfg.method.strategy.lora_dropout == 0.25 and cfg.runtime.fast_paths == "off"
    sectioned = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert set(sectioned) == {"model", "data", "method", "optim", "runtime"}
    assert sectioned["method"]["strategy"]["lora_dropout"] == 0.25 and sectioned["model"]["name"] == "lnshift/test-vit"
    assert FitConfig.from_dict(sectioned) == cfg
    assert FitConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.options()))) == cfg  # flat
    mixed = {"optim": sectioned["optim"], **{k: v for k, v in cfg.options().items() if OPTIONS[k].section != "optim"}}
    assert FitConfig.from_dict(mixed) == cfg
    for name, text in [("flat.yaml", yaml.safe_dump(cfg.options())), ("run.yaml", yaml.safe_dump({"fit": sectioned}))]:
        (tmp_path / name).write_text(text)
        assert parse(["--config", str(tmp_path / name)]) == cfg
    (tmp_path / "exp.yaml").write_text("optim: {lr: 0.01, epochs: 3}\nmethod: {name: lp, head: mlp}\n")
    cfg = parse(["--config", str(tmp_path / "exp.yaml"), "--epochs", "4"])  # options still win over the file
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.method.name, cfg.method.head) == (0.01, 4, "lp", "mlp")


def test_replace_takes_option_names_and_checks_again():
    cfg = FitConfig.from_dict(CHANGED)
    other = cfg.replace(lr=0.1, out="runs/y", lora_rank=4)
    assert (other.optim.lr, other.runtime.out, other.method.strategy.lora_rank) == (0.1, "runs/y", 4)
    assert cfg.optim.lr == 0.01 and other.data == cfg.data  # cfg unchanged; untouched sections shared, frozen
    with pytest.raises(ConfigError, match="--method lp"):
        cfg.replace(method="lp")  # lambda with a method that tunes no LayerNorm
    with pytest.raises(ConfigError, match="given twice"):
        FitConfig.from_dict({"lr": 0.1, "optim": {"lr": 0.2}})


def test_lambda_option_in_file_and_cli(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("lambda: auto\n")
    assert parse(["--config", str(f)]).method.lam == "auto"
    assert parse(["--lambda", "1.5"]).method.lam == "1.5"


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lrr: 1\n")
    with pytest.raises(ConfigError, match="lrr"):
        parse(["--config", str(f)])
    f.write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        parse(["--config", str(f)])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        parse(["--config", "/nonexistent.yaml"])


def test_resume_refuses_a_changed_option_and_accepts_a_changed_runtime_one(tmp_path):
    cfg = FitConfig.from_dict(CHANGED)
    run = run_with_config(tmp_path, cfg.to_dict())
    runtime = {"out": "runs/z", "progress": False, "workers": 5, "device": "cpu", "devices": 2, "eval_batch_size": 7}
    runtime.update(tensorboard=True, compile=True, fast_paths="all", resume=True)
    check_resume(run, cfg.replace(**runtime))
    for name, value in [("seed", 3), ("input_pipeline", "workers"), ("lora_dropout", 0.5), ("precision", "auto")]:
        with pytest.raises(RunDirError, match=rf"\['{name}'\]"):
            check_resume(run, cfg.replace(**{name: value}))
    assert [o.name for o in OPTIONS.values() if o.section == "runtime"] == [
        "out", "resume", "overwrite", "progress", "workers", "device", "devices", "eval_batch_size", "tensorboard",
        "compile", "fast_paths",
    ]  # fmt: skip


def test_a_run_saved_before_newer_options_compares_as_it_behaved(tmp_path):
    """config.yaml of an older lnshift lacks newer options: they compare as that version behaved."""
    old = FitConfig().options()
    for newer in ("input_pipeline", "compile", "frozen_dtype", "devices", "lora_dropout"):
        del old[newer]
    run = run_with_config(tmp_path, old)
    check_resume(run, FitConfig.from_dict({"input_pipeline": "workers"}))  # what older versions did: no error
    with pytest.raises(RunDirError, match="input_pipeline"):
        check_resume(run, FitConfig.from_dict({"input_pipeline": "device"}))
    with pytest.raises(RunDirError, match="frozen_dtype"):
        check_resume(
            run, FitConfig.from_dict({"input_pipeline": "workers", "frozen_dtype": "bf16", "precision": "bf16"})
        )
    with pytest.raises(RunDirError, match="lora_dropout"):
        check_resume(run, FitConfig.from_dict({"input_pipeline": "workers", "lora_dropout": 0.1}))


def test_a_run_written_before_sections_loads_resumes_and_reports(tmp_path, monkeypatch):
    """An interrupted run whose config.yaml has the flat `fit:` of earlier versions: --resume compares it and
    finishes the run; saved_run, the sweep's results and the report read it."""
    import lnshift.training.loop as loop
    from lnshift.analyses.saved_run import load_run
    from lnshift.experiments.sweep_results import _chosen
    from lnshift.report import write_report

    old = yaml.safe_load(BEFORE_SECTIONS)
    assert FitConfig.from_dict(old) == parse(["--out", "runs/old", *OLD_ARGS])
    out, real, calls = tmp_path / "old", loop.run_phase, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # killed as the second phase starts
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("lnshift.training.fit.run_phase", interrupted)
    assert main(["fit", "--out", str(out), *OLD_ARGS]) == 130
    config = rd.RunDir(out).read_config()
    rd.write_yaml(out / rd.CONFIG, {**config, "fit": {**old, "out": str(out)}})  # as an older version wrote it
    monkeypatch.setattr("lnshift.training.fit.run_phase", real)
    assert main(["fit", "--out", str(out), *OLD_ARGS, "--lr", "0.1", "--resume"]) == 2  # another lr: refused
    assert main(["fit", "--out", str(out), *OLD_ARGS, "--resume", "--device", "cpu", "--eval-batch-size", "64"]) == 0
    assert rd.RunDir(out).done
    assert rd.RunDir(out).read_config()["fit"]["optim"]["lr"] == 0.03  # the resumed run rewrote it by section
    rd.write_yaml(out / rd.CONFIG, {**rd.RunDir(out).read_config(), "fit": {**old, "out": str(out)}})
    saved = load_run(out)
    assert saved.cfg.method.name == "lp-ln" and saved.cfg.optim.steps == 4
    assert _chosen(rd.RunDir(out)) == {"lr": 0.03}
    page = write_report(out).read_text()
    assert "lp-ln, linear head" in page and "4 steps, batch 4, lr 0.03" in page


def test_lora_dropout_reaches_peft_and_config_yaml(tmp_path):
    from lnshift.analyses.saved_run import load_run

    out = tmp_path / "lora"
    data = ["--shots", "2", "--steps", "1", "--batch-size", "4", "--test", "a=builtin:pacs-mini/sketch"]
    assert (
        main(["fit", "--out", str(out), *TINY, *data, "--method", "lora", "--lora-dropout", "0.1", "--lora-rank", "2"])
        == 0
    )
    fit = rd.RunDir(out).read_config()["fit"]
    assert fit["method"]["strategy"]["lora_dropout"] == 0.1 and fit["method"]["strategy"]["lora_rank"] == 2
    lora = load_run(out).model.backbone.model.peft_config["default"]
    assert (lora.lora_dropout, lora.r) == (0.1, 2)
    assert json.loads((out / rd.METRICS).read_text())["test"]["a"]["n"] > 0


def test_builtin_test_sets_only_with_the_builtin_training_data():
    assert parse([]).data.test == BUILTIN_TESTS  # a plain `lnshift fit`: the built-in data end to end
    assert parse(["--train", "my/train"]).data.test == {}
    assert parse(["--train", "my/train", "--test", "a=x"]).data.test == {"a": "x"}
    assert FitConfig.from_dict({"train": "my.csv", "test_fraction": 0.2}).data.test == {}
