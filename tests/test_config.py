"""Config file, CLI options and validation agree; bad values name the option."""

import argparse

import pytest

from lnshift.config import BUILTIN_TESTS, OPTIONS, FitConfig, add_fit_options, config_from_args
from lnshift.errors import ConfigError


def parse(argv):
    p = argparse.ArgumentParser()
    add_fit_options(p)
    return config_from_args(p.parse_args(argv))


def test_cli_overrides_yaml(tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("method: lp\nlr: 0.01\nepochs: 3\ntest: {a: x}\n")
    cfg = parse(["--config", str(cfg_file), "--lr", "0.5", "--test", "b=y", "--include-rms"])
    assert cfg.method.name == "lp" and cfg.optim.epochs == 3 and cfg.optim.lr == 0.5
    assert cfg.data.test == {"b": "y"} and cfg.method.strategy.include_rms is True


def test_every_field_is_an_option():
    p = argparse.ArgumentParser()
    add_fit_options(p)
    text = p.format_help()
    for option in OPTIONS.values():
        assert option.flag in text


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
    ],
)
def test_validation_names_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FitConfig.from_dict(kwargs)


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


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        parse(["--config", "/nonexistent.yaml"])


def test_a_run_saved_before_newer_options_compares_as_it_behaved(tmp_path):
    """config.yaml of an older lnshift lacks newer options: they compare as that version behaved."""
    from lnshift import rundir as rd
    from lnshift.errors import RunDirError
    from lnshift.fit import check_resume

    old = FitConfig().options()
    for newer in ("input_pipeline", "compile", "frozen_dtype", "devices"):
        del old[newer]
    run = rd.RunDir(tmp_path / "run")
    run.prepare(resume=False, overwrite=False)
    rd.write_yaml(run / rd.CONFIG, {"fit": old})
    check_resume(run, FitConfig.from_dict({"input_pipeline": "workers"}))  # what older versions did: no error
    with pytest.raises(RunDirError, match="input_pipeline"):
        check_resume(run, FitConfig.from_dict({"input_pipeline": "device"}))
    with pytest.raises(RunDirError, match="frozen_dtype"):
        check_resume(
            run, FitConfig.from_dict({"input_pipeline": "workers", "frozen_dtype": "bf16", "precision": "bf16"})
        )


def test_builtin_test_sets_only_with_the_builtin_training_data():
    assert parse([]).data.test == BUILTIN_TESTS  # a plain `lnshift fit`: the built-in data end to end
    assert parse(["--train", "my/train"]).data.test == {}
    assert parse(["--train", "my/train", "--test", "a=x"]).data.test == {"a": "x"}
    assert FitConfig.from_dict({"train": "my.csv", "test_fraction": 0.2}).data.test == {}
