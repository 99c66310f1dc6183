"""Data parallelism on CPU (gloo): the slicing conventions, a 2-process torchrun run against one process, and
`lnshift sweep --devices 2` against one worker."""

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, RandomSampler

from lnshift import rundir as rd
from lnshift.cli import main
from lnshift.errors import ConfigError, RunDirError
from lnshift.experiments import sweep as sw
from lnshift.experiments import sweep_file as sf
from lnshift.experiments import workers
from lnshift.training import distributed as dist
from tiny import TINY


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 6, 100])
def test_shard_bounds_cover_n_contiguously_in_rank_order(n, world):
    bounds = [dist.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        dist.shard_bounds(n, world, world)


@pytest.mark.parametrize("world", [2, 3])
def test_slices_of_all_ranks_are_the_global_batches(world):
    def sampler():  # every rank draws the same seeded order
        return RandomSampler(range(23), num_samples=40, generator=torch.Generator().manual_seed(5))

    expected = list(BatchSampler(sampler(), 16, drop_last=False))  # 16, 16, 8
    per_rank = [list(dist.SliceSampler(sampler(), 16, r, world)) for r in range(world)]
    assert all(len(batches) == len(expected) == 3 for batches in per_rank)
    for k, batch in enumerate(expected):
        assert list(itertools.chain(*(slices[k] for slices in per_rank))) == batch
    last = [slices[-1] for slices in per_rank]  # 8 samples: 3+3+2 or 4+4
    assert [len(s) for s in last] == [
        stop - start for start, stop in (dist.shard_bounds(8, r, world) for r in range(world))
    ]


def test_an_empty_slice_becomes_a_placeholder_that_adds_nothing():
    # a last global batch of 1 sample on 2 ranks: rank 1 forwards sample 4 labelled IGNORE
    assert list(dist.SliceSampler(range(5), 4, 1, 2)) == [[2, 3], [~4]]
    data = dist.Placeholders([(torch.ones(2), 3), (torch.zeros(2), 1)] * 3)
    x, y = data[~4]
    assert torch.equal(x, torch.ones(2)) and y == dist.IGNORE and data[1][1] == 1
    logits = torch.randn(3, 4, requires_grad=True)
    loss = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1)(logits, torch.tensor([1, dist.IGNORE, 2]))
    loss.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0 and torch.count_nonzero(logits.grad[0]) > 0


def test_only_rank_0_writes_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "rank", lambda: 1)
    rd.write_json(tmp_path / "a.json", {})
    log = rd.EventLog(rd.RunDir(tmp_path), echo=pytest.fail, tensorboard=True)
    log.event("start")
    log.info("hello")
    assert list(tmp_path.iterdir()) == []


def test_fit_devices_relaunches_the_same_command_under_torchrun(monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr(dist, "launch", lambda n, argv: launched.append((n, argv)) or 0)
    argv = ["fit", "--devices", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert launched == [(2, argv)] and not (tmp_path / "run").exists()
    # under torchrun --devices must match the processes it started on this machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert main(argv) == 2 and not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# cyclic: DDP is rebuilt per phase; attention head over an avg-pool ViT: its trainable fc_norm is never used;
# 28 training images at batch 9: the last batch of 1 gives rank 1 a placeholder; --lambda auto: a gathered grid
FIT = [*TINY, "--model-kwargs", "{img_size: 32, patch_size: 8, global_pool: avg, fc_norm: true}", "--device", "cpu"]
FIT += ["--shots", "4", "--test", "sketch=builtin:pacs-mini/sketch", "--epochs", "4", "--batch-size", "9"]
FIT += ["--augment", "none", "--method", "cyclic", "--cycles", "1", "--head", "attention", "--lambda", "auto"]
# the tolerance below is for rounding noise that Adam scales to at most ~lr per step: pin a small lr, not the default
FIT += ["--lr", "0.001"]


def test_two_gloo_processes_train_the_same_run_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run: other thread counts round reductions differently
    try:
        assert main(["fit", "--out", str(one), *FIT]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    command = [*torchrun, str(free_port()), "-m", "lnshift", "fit", "--out", str(two), *FIT]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports

    a, b = load_file(one / rd.ADAPTER), load_file(two / rd.ADAPTER)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    base = load_file(two / rd.BASE)
    assert not torch.equal(a["backbone.model.blocks.0.norm1.weight"], base["backbone.model.blocks.0.norm1.weight"])
    assert torch.equal(a["backbone.model.fc_norm.weight"], base["backbone.model.fc_norm.weight"])  # unused

    ma, mb = (json.loads((run / rd.METRICS).read_text()) for run in (one, two))
    for split in ("val", "sketch"):
        sa, sb = (ma["val"], mb["val"]) if split == "val" else (ma["test"][split], mb["test"][split])
        assert sb["n"] == sa["n"] == (56 if split == "val" else 140)  # every sample once, none padded
        assert sb == pytest.approx(sa, abs=1e-5)
    la, lb = (json.loads((run / rd.LAMBDA).read_text()) for run in (one, two))
    assert lb["lambda"] == la["lambda"] and len(lb["curve"]) == 13
    assert [p["n"] for p in lb["curve"]] == [56] * 13
    ha, hb = (json.loads((run / rd.CYCLES).read_text())["phases"] for run in (one, two))
    assert [h["train_loss"] for p in hb for h in p["history"]] == pytest.approx(
        [h["train_loss"] for p in ha for h in p["history"]], abs=1e-5
    )
    # one writer: the same files, one log line per event, and nothing written outside the run directory
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for log in (rd.EVENTS, rd.LOG):
        assert len((two / log).read_text().splitlines()) == len((one / log).read_text().splitlines())
    assert list(cwd.iterdir()) == []


def test_sweep_on_two_workers_gives_the_same_table_as_one(tmp_path, capsys):
    spec = {
        "base": {
            "model": "lnshift/test-vit",
            "model_kwargs": {"img_size": 32, "patch_size": 8},
            "min_epoch_steps": 1,
            "workers": 0,
            "steps": 2,
            "batch_size": 8,
        },
        "datasets": {
            "mini": {"train": "builtin:pacs-mini/photo", "test": {"sketch": "builtin:pacs-mini/sketch"}},
            "broken": {"train": str(tmp_path / "missing")},
        },
        "methods": ["lp", "ln+auto"],
        "regimes": [{"shots": 2}],
        "seeds": [0, 1],
    }
    tables, errors = [], []
    for devices, per_device in ((1, 1), (2, 1), (1, 2)):
        path = tmp_path / f"sweep{devices}x{per_device}.yaml"
        path.write_text(yaml.safe_dump({"out": str(tmp_path / f"out{devices}x{per_device}"), **spec}))
        sweep = sf.load_sweep(path)
        if per_device == 1:
            with pytest.raises(RunDirError) as failed:
                sw.run_sweep(sweep, echo=lambda _: None, devices=devices, per_device=per_device)
            errors.append(str(failed.value))
        else:  # through the CLI, which starts the workers before it imports torch
            assert main(["sweep", str(path), "--devices", str(devices), "--per-device", str(per_device)]) == 2
            errors.append(capsys.readouterr().err.split("error: ", 1)[1])
        results = json.loads((sweep.out / "results.json").read_text())
        tables.append([{k: v for k, v in row.items() if k != "run"} for row in results["rows"]])
    # the same cells and, up to float rounding of different thread counts, the same numbers
    assert len(tables[0]) == 2 * 2  # lp and ln+auto x 2 seeds of mini
    for other in tables[1:]:
        for a, b in zip(tables[0], other, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                number = isinstance(a[k], float) and isinstance(b[k], float)
                assert b[k] == (pytest.approx(a[k], rel=1e-4, abs=1e-6) if number else a[k]), k
    # each of the 2 workers ran with its share of the cores, not a pool of all of them
    config = yaml.safe_load(next((tmp_path / "out2x1").rglob("config.yaml")).read_text())
    expected = os.environ.get("OMP_NUM_THREADS") or str(workers.worker_threads(2))
    assert config["environment"]["torch_threads"] == expected
    for message in errors:  # the broken dataset's 4 units fail alike, the others finish
        assert message.startswith("4 of 8 runs failed") and message.count("broken/") == 4


def test_sweep_workers_get_one_visible_gpu_each(tmp_path, monkeypatch):
    # the pool assigns GPUs before torch is imported: those listed in CUDA_VISIBLE_DEVICES, else 0..N-1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert workers.visible_gpus(2) == ["3", "5"]
    assert workers.visible_gpus(4) == ["3", "5", "7", None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert workers.visible_gpus(2) == ["0", "1"]
    # once torch is loaded, the sweep checks them against the machine and the sweep file
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "out"),
                "base": {"device": "cuda:1"},
                "datasets": {"d": {"train": "x"}},
                "methods": ["ln"],
                "regimes": [{"shots": 1}],
                "seeds": [0],
            }
        )
    )
    sweep = sf.load_sweep(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(ConfigError, match=r"base\.device"):
        sw.check_gpus(2, sweep)
    sweep.base["device"] = "auto"
    sw.check_gpus(2, sweep)
    with pytest.raises(ConfigError, match="--devices 4: only 3 GPU"):
        sw.check_gpus(4, sweep)


def test_sweep_refuses_fewer_than_one_worker(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    spec = {"out": str(tmp_path / "out"), "base": {}, "datasets": {"d": {"train": "x"}}, "methods": ["ln"]}
    path.write_text(yaml.safe_dump({**spec, "regimes": [{"shots": 1}], "seeds": [0]}))
    # the CLI checks before it starts any worker or imports the sweep code
    assert main(["sweep", str(path), "--devices", "0"]) == 2
    assert "--devices and --per-device must be >= 1, got 0 and 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="got 2 and -1"):
        sw.run_sweep(sf.load_sweep(path), echo=lambda _: None, devices=2, per_device=-1)
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained
