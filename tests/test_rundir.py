"""Atomic writes and the run-directory policy (refuse, resume, overwrite)."""

import logging
import os
import stat

import pytest
import torch

from lnshift import rundir as rd
from lnshift.errors import RunDirError


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    rd.write_json(target, {"a": 1})

    def broken(path):
        path.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        rd.atomic_write(target, broken)
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_tensors_round_trip_with_metadata(tmp_path):
    tensors = {"a.weight": torch.randn(3), "b.bias": torch.randn(2, 2)}
    rd.write_tensors(tmp_path / "x.safetensors", tensors, {"norms": ["a"], "note": "plain"})
    run = rd.RunDir(tmp_path)
    loaded, meta = run.read_tensors("x.safetensors")
    assert meta == {"norms": ["a"], "note": "plain"}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_prepare_refuses_existing_run(tmp_path):
    run = rd.RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    (run / "config.yaml").write_text("x")
    rd.write_tensors(run / rd.CHECKPOINT_STATE, {}, {})  # it trained: there is something to resume
    with pytest.raises(RunDirError, match="unfinished run; pass --resume"):
        run.prepare(resume=False, overwrite=False)
    run.prepare(resume=True, overwrite=False)
    assert (run / "config.yaml").exists()
    run.prepare(resume=False, overwrite=True)
    assert not (run / "config.yaml").exists()


def test_finished_run_is_refused_without_suggesting_resume(tmp_path):
    run = rd.RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    run.mark_done()
    for resume in (False, True):
        with pytest.raises(RunDirError, match="finished run") as err:
            run.prepare(resume=resume, overwrite=False)
        assert "--overwrite" in str(err.value) and "pass --resume" not in str(err.value)


def test_run_that_never_trained_is_replaced(tmp_path):
    """What a run writes before its first checkpoint holds nothing to resume; anything else is kept."""
    run = rd.RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    for name in (rd.CONFIG, rd.EVENTS, rd.LOG):
        (run / name).write_text("x")
    (run / rd.CHECKPOINT).mkdir()
    run.prepare(resume=False, overwrite=False)
    assert run.path.is_dir() and not any(run.path.iterdir())
    (run / rd.CONFIG).write_text("x")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="unfinished run"):
        run.prepare(resume=False, overwrite=False)


def test_resume_without_run_and_incomplete_run_hint(tmp_path):
    with pytest.raises(RunDirError, match="no run to resume"):
        rd.RunDir(tmp_path / "none").prepare(resume=True, overwrite=False)
    run = rd.RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="did not finish"):
        run.require(rd.ADAPTER)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        rd.write_json(tmp_path / "new.json", {"a": 1})
        rd.write_tensors(tmp_path / "new.safetensors", {"w": torch.zeros(2)}, {})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    for name in ("new.json", "new.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name
    (tmp_path / "new.json").chmod(0o640)  # rewriting a file keeps its mode, as open(path, "w") does
    rd.write_json(tmp_path / "new.json", {"a": 2})
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640


def test_log_lines_go_to_train_log_the_lnshift_logger_and_echo(tmp_path, caplog):
    """Library users get the lines as logging records; train.log is written whatever logging's level."""
    run, echoed = rd.RunDir(tmp_path), []
    log = rd.EventLog(run, echoed.append)
    with caplog.at_level(logging.INFO, logger="lnshift"):
        log.info("phase ln: 10 steps")
    assert [(r.name, r.levelno, r.getMessage(), r.run) for r in caplog.records] == [
        ("lnshift", logging.INFO, "phase ln: 10 steps", str(tmp_path))
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lnshift"):
        log.info("epoch 1")
    assert not caplog.records and echoed == ["phase ln: 10 steps", "epoch 1"]
    lines = (tmp_path / rd.LOG).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["phase ln: 10 steps", "epoch 1"]
