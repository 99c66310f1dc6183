"""`run_demo` in its fast mode: every row in the table and demo.json, and a second call reuses the runs."""

import json

import pytest
import torch

from lnshift import rundir as rd
from lnshift.errors import ConfigError
from lnshift.experiments import demo


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only add contention on a busy machine
    try:
        out = tmp_path_factory.mktemp("demo")
        lines: list[str] = []
        result = demo.run_demo(out, fast=True, echo=lines.append)
        yield out, result, lines
    finally:
        torch.set_num_threads(threads)


def forbid(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished demo run was redone")

    for name in ("fit", "fit_batched", "rescale_run", "estimate_fsr_of_run"):
        monkeypatch.setattr(demo, name, fail)


def test_table_has_every_method(first):
    _, result, lines = first
    printed = "\n".join(lines)
    assert demo.demo_table(result) in printed
    table_rows = {line.split()[0] for line in demo.demo_table(result).splitlines()}
    assert {v.name for v in demo.VARIANTS} <= table_rows
    assert [row["method"] for row in result["rows"]] == [v.name for v in demo.VARIANTS]


def test_lambdas_fsr_and_parameters_recorded(first):
    out, result, _ = first
    rows = {row["method"]: row for row in result["rows"]}
    grid = [float(x) for x in demo.FAST["lambda_grid"].split(",")]
    assert rows["ln+auto"]["lambda"] in grid and rows["cyclic+auto"]["lambda"] in grid
    estimate = rd.RunDir(out / "ln").read_json(rd.FSR_ESTIMATE)
    assert rows["ln+fsr"]["lambda"] == estimate["lambda"]
    assert rows["ln+fsr"]["fsr_est"] == estimate["fsr_est"]
    assert rows["lp"]["lambda"] is None and rows["lp"]["shift_gamma"] is None
    assert 0 < rows["lp"]["trainable_parameters"] < rows["ln"]["trainable_parameters"]
    assert rows["ln+auto"]["trainable_parameters"] == rows["ln"]["trainable_parameters"]
    for row in result["rows"]:
        assert set(row["test"]) == {demo.ID_TEST, *demo.OOD_TESTS}
        assert row["ood"] == pytest.approx(sum(row["test"][k] for k in demo.OOD_TESTS) / len(demo.OOD_TESTS))
        assert row["n"]["train"] == 4 * 7  # 4 shots x 7 classes


def test_learning_rates_are_chosen_on_validation_in_one_batched_pass(first):
    out, result, _ = first
    grid = demo.FAST["search"]["lr"]
    for method in ("lp", "ln", "cyclic"):
        search = json.loads((out / method / "search.json").read_text())
        assert [c["values"]["lr"] for c in search["candidates"]] == grid
        accuracies = [c["val"]["accuracy"] for c in search["candidates"]]
        assert search["chosen"]["lr"] == grid[accuracies.index(max(accuracies))]
        config = rd.RunDir(out / method / "search" / f"lr={grid[0]:g}").read_config()
        assert len(config["batched"]["with"]) == len(grid)  # the candidates trained together
    rows = {row["method"]: row for row in result["rows"]}
    assert (
        rows["ln+auto"]["lr"]
        == rows["ln"]["lr"]
        == json.loads((out / "ln" / "search.json").read_text())["chosen"]["lr"]
    )


def test_demo_json_written(first):
    out, result, _ = first
    saved = json.loads((out / demo.RESULT).read_text())
    assert [row["method"] for row in saved["rows"]] == [row["method"] for row in result["rows"]]
    assert saved["config"]["fast"] is True and saved["config"]["fit"]["ln"]["optim"]["steps"] == demo.FAST["steps"]
    assert "torch" in saved["environment"]


def test_fsr_estimate_counts_its_runs(first):
    lines = first[2]
    assert any(line.strip().startswith("FSR estimate 1/2: ") for line in lines)
    assert any(line.strip().startswith("FSR estimate 2/2: ") for line in lines)


def test_report_of_the_demo_directory(first):
    """A demo directory is a small sweep: `lnshift report runs/demo` works."""
    from lnshift.report import write_report

    out, result, _ = first
    page = write_report(out).read_text()
    assert all(row["method"] in page for row in result["rows"]) and "sketch" in page


def test_rerun_reuses_runs(first, monkeypatch):
    out, result, _ = first
    done = {p: p.stat().st_mtime_ns for p in out.rglob(rd.DONE)}
    forbid(monkeypatch)
    again = demo.run_demo(out, fast=True, echo=None)
    assert again["rows"] == result["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob(rd.DONE)} == done


def test_interrupted_run_is_resumed(first, monkeypatch):
    out = first[0]  # in place: fit refuses to resume a run directory that was moved (its `out` differs)
    (out / "lp" / rd.DONE).unlink()
    calls = []
    real_fit = demo.fit

    def spy(cfg, echo=None):
        calls.append((cfg.method.name, cfg.runtime.resume))
        return real_fit(cfg, echo=echo)

    monkeypatch.setattr(demo, "fit", spy)
    demo.run_demo(out, fast=True, echo=None)
    assert calls == [("lp", True)]
    assert (out / "lp" / rd.DONE).is_file()


def test_other_options_refused(first):
    with pytest.raises(ConfigError, match="other options"):
        demo.run_demo(first[0], fast=True, seed=1, echo=None)
