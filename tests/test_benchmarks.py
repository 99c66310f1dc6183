"""The GPU benchmarks run in their CPU smoke form (tiny model, a few steps) and print their figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def smoke(script: str, out: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_sweep_cost_prints_its_table(tmp_path):
    stdout = smoke("sweep_cost.py", tmp_path / "cost.json")
    assert "(b) / (c)" in stdout and "max |batched - one by one|" in stdout
    assert (tmp_path / "cost.json").exists()


def test_throughput_measures_the_reference_and_lnshift_side_by_side(tmp_path):
    stdout = smoke("throughput.py", tmp_path / "speed.json")
    assert "reference" in stdout and "plain" in stdout
    report = json.loads((tmp_path / "speed.json").read_text())
    variants = report["results"][0]["variants"]
    assert set(variants) == {"reference", "plain", "eval"}
    for row in variants.values():
        assert row["img_per_s"] > 0 and row["tflops"] > 0
    assert variants["plain"]["vs_reference"] == pytest.approx(
        variants["plain"]["img_per_s"] / variants["reference"]["img_per_s"]
    )
    assert report["results"][0]["train_gflop_per_image"] > 0 and "environment" in report
