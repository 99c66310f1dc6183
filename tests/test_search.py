"""Hyperparameter selection on validation (search.py): candidates, selection, the chosen run, failures, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lnshift import pipeline
from lnshift import rundir as rd
from lnshift.analyses import saved_run
from lnshift.cli import main
from lnshift.config import FitConfig
from lnshift.errors import ConfigError
from lnshift.training import fit as fit_module
from lnshift.training.loop import NonFiniteLossError
from lnshift.training.search import SEARCH_JSON, SearchError, best
from tiny import TINY

DATA = ["--shots", "4", "--test", "photo=builtin:pacs-mini/photo-test", "--test", "sketch=builtin:pacs-mini/sketch"]
GRID = "0.001,0.03"


def fit(out, *extra):
    return main(["fit", "--out", str(out), *TINY, *DATA, "--steps", "6", "--batch-size", "8", *extra])


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One `--lr A,B --lambda auto` search; every test set evaluation during it is recorded."""
    out = tmp_path_factory.mktemp("search") / "run"
    calls = []
    real = fit_module.evaluate_all

    def spy(model, val, tests, *args, **kwargs):
        calls.append((sorted(tests), (out / SEARCH_JSON).exists() and json.loads((out / SEARCH_JSON).read_text())))
        return real(model, val, tests, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for module in (fit_module, saved_run):  # training scores the candidates, the final lambda the chosen run
            mp.setattr(module, "evaluate_all", spy)
        assert fit(out, "--lr", GRID, "--lambda", "auto") == 0
    return out, calls


def test_search_writes_every_candidate_and_chooses_the_best_on_validation(searched):
    out, _ = searched
    result = json.loads((out / SEARCH_JSON).read_text())
    assert result["grid"] == {"lr": [0.001, 0.03]} and result["metric"] == "accuracy"
    assert [c["values"] for c in result["candidates"]] == [{"lr": 0.001}, {"lr": 0.03}]
    for c in result["candidates"]:
        assert c["status"] == "done" and c["steps"] == 6 and c["wall_s"] > 0
        assert (out / c["run"] / rd.DONE).is_file()
        assert "test" not in c["val"]
    accs = [c["val"]["accuracy"] for c in result["candidates"]]
    expected = 0 if accs[0] >= accs[1] else 1  # ties go to the smaller value
    assert result["chosen"] == result["candidates"][expected]["values"]
    config = rd.RunDir(out).read_config()
    optim = config["fit"]["optim"]  # config.yaml records the options by section
    assert optim["lr"] == result["chosen"]["lr"] and optim["search"] == {"lr": [0.001, 0.03]}
    assert config["search"]["chosen"] == result["chosen"]


def test_test_sets_are_scored_for_the_chosen_run_only_after_selection(searched):
    out, calls = searched
    scored = [(tests, search) for tests, search in calls if tests]
    assert len(calls) == 3  # two candidates (validation only), then the chosen run
    assert len(scored) == 1 and scored[0][0] == ["photo", "sketch"]
    assert scored[0][1]["chosen"] is not None  # selection was made before any test set was touched
    for c in scored[0][1]["candidates"]:
        assert not json.loads((out / c["run"] / rd.METRICS).read_text())["test"]


def test_chosen_run_equals_a_plain_fit_at_that_value_bit_for_bit(searched, tmp_path):
    out, _ = searched
    chosen = json.loads((out / SEARCH_JSON).read_text())["chosen"]["lr"]
    plain = tmp_path / "plain"
    assert fit(plain, "--lr", str(chosen), "--lambda", "auto") == 0
    for name in (rd.ADAPTER, rd.BASE, rd.FINETUNED):
        a, b = load_file(out / name), load_file(plain / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in (rd.METRICS, rd.LAMBDA, rd.SHIFT, rd.CYCLES, rd.SPLITS):
        a, b = (json.loads((run / name).read_text()) for run in (out, plain))
        if name == rd.LAMBDA:  # the seconds the lambda grid took differ
            a.pop("cost"), b.pop("cost")
        assert a == b, name


def test_a_diverged_candidate_is_recorded_as_failed_and_the_others_still_run(tmp_path, monkeypatch):
    real = fit_module.run_phase

    def diverging(model, plan, cfg, *args, **kwargs):
        if cfg.optim.lr >= 0.03:
            raise NonFiniteLossError("loss is nan at step 3")
        return real(model, plan, cfg, *args, **kwargs)

    monkeypatch.setattr(fit_module, "run_phase", diverging)
    assert fit(tmp_path / "r", "--lr", GRID) == 0
    result = json.loads((tmp_path / "r" / SEARCH_JSON).read_text())
    assert [c["status"] for c in result["candidates"]] == ["done", "failed"]
    assert "nan" in result["candidates"][1]["error"] and result["chosen"] == {"lr": 0.001}
    assert (tmp_path / "r" / rd.DONE).is_file()
    with pytest.raises(SearchError, match="all 2 candidates of the search failed"):
        pipeline.fit(_options(tmp_path / "all", lr="0.03,0.3"), echo=None)


def _options(out, **extra):
    return FitConfig.from_dict(
        dict(
            model="lnshift/test-vit",
            model_kwargs={"img_size": 32, "patch_size": 8},
            shots=4,
            steps=4,
            batch_size=8,
            min_epoch_steps=1,
            workers=0,
            progress=False,
            test={},
            out=str(out),
            **extra,
        )
    )


def test_a_killed_search_resumes_with_its_finished_candidates(tmp_path, monkeypatch):
    cfg = _options(tmp_path / "r", lr="0.001,0.01")
    real = fit_module.run_phase
    trained = []

    def once(model, plan, c, *args, **kwargs):
        trained.append(c.optim.lr)
        if c.optim.lr == 0.01 and len(trained) == 2:
            raise KeyboardInterrupt  # killed during the second candidate
        return real(model, plan, c, *args, **kwargs)

    monkeypatch.setattr(fit_module, "run_phase", once)
    with pytest.raises(KeyboardInterrupt):
        pipeline.fit(cfg, echo=None)
    with pytest.raises(Exception, match="unfinished run"):
        pipeline.fit(cfg, echo=None)
    pipeline.fit(cfg.replace(resume=True), echo=None)
    assert trained == [0.001, 0.01, 0.01]  # the finished candidate was not trained again
    assert json.loads((tmp_path / "r" / SEARCH_JSON).read_text())["chosen"] is not None


def test_grids_come_from_the_lr_option_or_search_and_auto_is_the_methods_grid():
    from lnshift.training.phases import LR_GRID

    assert FitConfig.from_dict({"lr": "auto", "method": "full"}).optim.search == {"lr": list(LR_GRID["full"])}
    cfg = FitConfig.from_dict({"lr": "3e-2,1e-3,1e-3"})
    assert cfg.optim.search == {"lr": [0.001, 0.03]}
    assert FitConfig.from_dict({"search": {"weight_decay": [0.05, 0]}}).optim.search == {"weight_decay": [0.0, 0.05]}
    for bad, match in [
        ({"lr": "fast"}, "--lr"),
        ({"search": {"seed": [1, 2]}}, "'seed' cannot be searched"),
        ({"search": {"weight_decay": "auto"}}, "'auto' exists for lr only"),
        ({"search": {"lr": []}}, "non-empty list"),
        ({"select_metric": "speed"}, "--select-metric"),
    ]:
        with pytest.raises(ConfigError, match=match):
            FitConfig.from_dict(bad)


@pytest.mark.parametrize(
    ("metric", "vals", "expected"),
    [
        ("accuracy", [0.5, 0.7, 0.7], 1),  # a tie goes to the smaller value
        ("loss", [0.9, 0.4, 0.6], 1),  # smaller is better
        ("accuracy", [float("nan"), 0.2, 0.1], 1),  # nan never wins
    ],
)
def test_best_candidate(metric, vals, expected):
    records = [{"status": "done", "val": {metric: v}} for v in vals]
    assert best(records, metric) == expected
    records[expected]["status"] = "failed"
    assert best(records, metric) != expected


def test_fsr_sub_runs_train_and_keep_exactly_the_runs_steps(tmp_path):
    """With --select best a sub-run could keep an earlier epoch; the estimate assumes every run has the full budget."""
    out = tmp_path / "r"
    assert fit(out, "--lr", "0.001,0.03", "--lambda", "fsr", "--fsr-subsets", "0.5,0.75", "--fsr-seeds", "1") == 0
    chosen = json.loads((out / SEARCH_JSON).read_text())["chosen"]["lr"]
    subs = sorted((out / "fsr-estimate").iterdir())
    assert len(subs) == 2
    for sub in subs:
        optim = rd.RunDir(sub).read_config()["fit"]["optim"]
        assert optim["select"] == "last" and optim["search"] == {} and optim["lr"] == chosen
        [phase] = json.loads((sub / rd.CYCLES).read_text())["phases"]
        assert phase["steps"] == 6 and phase["history"][-1]["step"] == 6
        assert phase["best_epoch"] == len(phase["history"]) > 1  # the last of several epochs was kept
    assert json.loads((out / rd.FSR_ESTIMATE).read_text())["steps_per_run"] == 6
