"""Atomic writes and the run-directory policy (refuse, resume, overwrite)."""

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
    with pytest.raises(RunDirError, match="--resume"):
        run.prepare(resume=False, overwrite=False)
    run.prepare(resume=True, overwrite=False)
    assert (run / "config.yaml").exists()
    run.prepare(resume=False, overwrite=True)
    assert not (run / "config.yaml").exists()


def test_resume_without_run_and_incomplete_run_hint(tmp_path):
    with pytest.raises(RunDirError, match="no run to resume"):
        rd.RunDir(tmp_path / "none").prepare(resume=True, overwrite=False)
    run = rd.RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="did not finish"):
        run.require(rd.ADAPTER)
