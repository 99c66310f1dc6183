"""The GPU benchmarks run in their CPU smoke form (tiny model, a few steps) and print their figures."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def smoke(script: str, out: Path, *options: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(out), *options],
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


def test_sweep_cost_in_epochs_gives_each_fraction_its_own_length(tmp_path):
    stdout = smoke("sweep_cost.py", tmp_path / "cost.json", "--length", "epochs", "--epochs", "0.5")
    record = json.loads((tmp_path / "cost.json").read_text())
    # 240 training images, batch 4: half an epoch of 25 / 50 / 75 / 100 % is 8 / 15 / 23 / 30 steps
    assert record["steps_per_run"] == [8] * 3 + [15] * 3 + [23] * 3 + [30] * 3
    assert record["steps_c"] == 30
    assert "0.5 epochs of its own images" in stdout and record["max_abs_diff_layernorm_run0"] < 1e-4


def test_sweep_cost_times_a_learning_rate_grid_against_one_run(tmp_path):
    stdout = smoke("sweep_cost.py", tmp_path / "grid.json", "--study", "lr-grid", "--lrs", "0.01,0.1")
    record = json.loads((tmp_path / "grid.json").read_text())
    assert record["runs"] == 6 and record["seconds"]["grid"] > 0 and record["gflop_per_image"] > 0
    assert record["max_abs_diff_run0"] < 1e-4  # run 0 of the grid is the run trained alone
    assert "(g) / (1)" in stdout


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
    assert report["matmul_tflops"] > 0 and f"{report['matmul_tflops']:.3g} TFLOP/s" in stdout  # the machine's rate
    assert "SM MHz" in stdout and report["gpu_limits"] == {}  # no GPU to read clocks and power from


def throughput_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import throughput
    finally:
        sys.path.remove(str(BENCHMARKS))
    return throughput


def test_each_fast_path_can_be_measured_off():
    fast_paths = throughput_module().variant_fast_paths
    assert fast_paths("compiled-bf16") == fast_paths("eval-compiled") == ("patch_matmul", "table_gelu", "class_token")
    assert fast_paths("compiled-bf16-convpatch") == ("table_gelu", "class_token")
    assert fast_paths("compiled-bf16-erfgelu") == ("patch_matmul", "class_token")
    assert fast_paths("compiled-bf16-alltokens") == ("patch_matmul", "table_gelu")
    assert fast_paths("compiled-bf16-nofast") == fast_paths("eval-compiled-nofast") == ()


def test_a_profiled_compiled_run_prints_its_profile_of_the_recorded_steps():
    command = [
        *(sys.executable, str(BENCHMARKS / "throughput.py"), "--models", "test_vit", "--model-kwargs"),
        *('{"img_size": 32}', "--batch-size", "8", "--steps", "2", "--warmup", "2", "--images", "32"),
        *("--workers", "0", "--variants", "compiled", "--profile", "--device", "cpu"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    optimizer_steps = next(line for line in done.stdout.splitlines() if "Optimizer.step#AdamW.step" in line)
    assert int(optimizer_steps.split()[-1]) == throughput_module().PROFILED_STEPS  # "# of Calls", the last column


def test_sampled_keeps_the_median_of_each_column_printed_while_the_block_ran(tmp_path):
    sampled = throughput_module().sampled
    printed = tmp_path / "printed"
    fake_smi = (  # prints as `nvidia-smi -lms` would (plus an unreadable and a cut-off line), then runs on
        "import pathlib, sys, time\n"
        "print('1650, 640.5, Active\\n[N/A], 1.0, Active\\n1700, 650.0, Active\\n1500, 600.0, Not Active\\n1600',"
        " flush=True)\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "time.sleep(120)"
    )
    with sampled([sys.executable, "-c", fake_smi, str(printed)], ("sm_clock_mhz", "power_w", "power_capped")) as gpu:
        deadline = time.monotonic() + 60
        while not printed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gpu == {}  # filled when the block ends
    assert gpu == {"sm_clock_mhz": 1650.0, "power_w": 640.5, "power_capped": 1.0}
    with sampled(None, ("sm_clock_mhz",)) as nothing:
        pass
    assert nothing == {}


@pytest.mark.parametrize(
    ("script", "option"), [("throughput.py", "--variants=compiled-bf16-grafs"), ("kernel_probes.py", "--parts=gem")]
)
def test_unknown_variants_and_parts_are_refused_by_name(script, option):
    command = [sys.executable, str(BENCHMARKS / script), option]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    name, value = option.split("=")
    assert f"{name}: unknown {value} (choose from" in done.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--fractions", "0,1"], "argument --fractions: '0,1': every fraction must be in (0, 1]"),
        (["--fractions", "half"], "argument --fractions: 'half' is not a comma-separated list of numbers"),
        (
            ["--length", "epochs", "--epochs", "0.5", "--fractions", "0.02,1"],
            "the runs on fraction(s) 0.02 get fewer steps than cyclic's 4 phases: raise --epochs",
        ),
    ],
)
def test_sweep_cost_refuses_bad_fractions_by_name(options, message):
    command = [sys.executable, str(BENCHMARKS / "sweep_cost.py"), "--smoke", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


def test_protocol_claims_pairs_cells_by_dataset_regime_and_seed(tmp_path):
    # LN beats LP by 10 points in three (regime, seed) pairs and loses by 2 in the fourth
    rows = []
    for regime, fraction in (("f0.1", 0.1), ("f1", 1.0)):
        for seed in (0, 1):
            lp = 0.5 + 0.1 * seed
            ln = lp - 0.02 if (regime, seed) == ("f1", 1) else lp + 0.1
            for method, accuracy, lam in (("lp", lp, None), ("ln", ln, 1.0), ("ln+auto", ln, 1.5)):
                rows.append(
                    {
                        "id": f"d/{method}/{regime}/s{seed}",
                        "dataset": "d",
                        "method": method,
                        "regime": regime,
                        "fraction": fraction,
                        "shots": None,
                        "seed": seed,
                        "lambda": lam,
                        "fsr_oracle": 0.8 if method != "lp" and regime != "f1" else None,
                        "fsr_est": 1.2 if method != "lp" and regime != "f1" else None,
                        "val.accuracy": accuracy,
                        "test.holdout.accuracy": accuracy,
                        "test.other.accuracy": 0.3,
                    }
                )
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows, "seeds": [0, 1], "cells": 12, "missing": []}))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "protocol_claims.py"), str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "12 of 12 cells; 0 missing" in out
    assert "| d f0.1 | 55.0 | 65.0 | 65.0 |" in out  # LP, LN, LN+auto: mean of seeds 0 and 1
    assert "| LN vs LP | 3 / 0 / 1 | +7.0 |" in out  # (10 + 10 + 10 - 2) / 4
    assert "| LN vs LP | +10.0 | +4.0 |" in out  # by regime: f0.1, f1
    # FSR below 100 % data: oracle 0.8 (2 of 2 below 1), estimate 1.2, error 0.4, never on the same side
    assert "| d | 0.80 (2 of 2) | 1.20 | 0.40 | 0 of 2 | 1.50 (4 / 0 / 0) |" in out


def test_pretraining_claims_sides_by_construction_and_fsr_at_the_reference_lr(tmp_path):
    # cifar10 is inside the CIFAR-10 model's pretraining data, sketch outside; the 2 % LN run on cifar10 chose a
    # smaller lr than its 100 % reference (FSR 0.5), the one on sketch the same lr (FSR 1.4)
    rows = []
    for dataset, small_lr, fsr in (("cifar10", 1e-3, 0.5), ("pacs-sketch", 1e-2, 1.4)):
        for regime, lr in (("f0.02", small_lr), ("f1", 1e-2)):
            for method, acc in (("lp", 0.6), ("ln", 0.7 if dataset == "pacs-sketch" else 0.5), ("ln+auto", 0.7)):
                rows.append(
                    {
                        "id": f"{dataset}/{method}/{regime}/s0",
                        "dataset": dataset,
                        "method": method,
                        "regime": regime,
                        "seed": 0,
                        "lr": lr,
                        "lambda": {"lp": None, "ln": 1.0, "ln+auto": 0.5 if dataset == "cifar10" else 1.25}[method],
                        "fsr_oracle": (fsr if regime == "f0.02" else 1.0) if method == "ln" else None,
                        "shift_ln": 2.0 if method == "ln" else None,
                        "test.holdout.accuracy": acc,
                    }
                )
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows}))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "pretraining_claims.py"), f"lnshift/vit-tiny-cifar10={results}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    inside = next(line for line in lines if "/ cifar10 (inside)" in line)
    outside = next(line for line in lines if "/ pacs-sketch (outside)" in line)
    # LN acc, LN - LP at 100 % and 2 %, shift, FSR (all), FSR at the reference's lr, lambda auto, LN+auto - LN
    assert "| 50.0 | -10.0 | -10.0 | 2.00 | 0.50 (1 of 1) | - (0 of 0) | 0.50 (0 / 0 / 2) | +20.0 |" in inside
    assert "| 70.0 | +10.0 | +10.0 | 2.00 | 1.40 (0 of 1) | 1.40 (0 of 1) | 1.25 (2 / 0 / 0) | +0.0 |" in outside
    assert any("all inside" in line for line in lines) and any("all outside" in line for line in lines)
