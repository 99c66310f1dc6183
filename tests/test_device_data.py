"""The device input pipeline: same inputs as timm's eval transform, torchvision's crop rule, exact sharding,
and a training run that matches the workers pipeline when nothing random differs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lnshift import rundir as rd
from lnshift.cli import main
from lnshift.data import ImageDataset, make_transform, open_source
from lnshift.data import device as dd
from lnshift.data.builtin import resolve_spec
from lnshift.errors import ConfigError
from lnshift.training.distributed import shard_bounds
from tiny import TINY, max_diff

CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.3),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
}


@pytest.fixture(scope="module")
def photos():
    source = open_source(resolve_spec("builtin:pacs-mini/photo"))
    idx = list(range(0, len(source), 7))
    class_to_idx = {c: i for i, c in enumerate(source.classes)}
    ds = ImageDataset(source, idx, class_to_idx, make_transform(CONFIG, train=False))
    ds.split = "val"
    return ds


def test_eval_images_are_bit_identical_to_timms_eval_transform(photos):
    images = dd.to_device(photos, CONFIG, torch.device("cpu"), crops=False, threads=2)
    assert images.split == "val" and images.images.dtype == torch.uint8
    xs, ys = zip(*dd.DeviceBatches(images, 5, train=False), strict=True)
    reference = torch.stack([photos[k][0] for k in range(len(photos))])
    assert torch.equal(torch.cat(xs), reference)
    assert torch.cat(ys).tolist() == photos.targets


def test_decoded_images_are_cached_across_runs(photos, monkeypatch):
    dd.CACHE.clear()
    calls = {"n": 0}
    real = photos.source.load

    def counting(i):
        calls["n"] += 1
        return real(i)

    monkeypatch.setattr(photos.source, "load", counting)
    first = dd.to_device(photos, CONFIG, torch.device("cpu"), crops=True, threads=1)
    assert calls["n"] == len(photos)
    second = dd.to_device(photos, CONFIG, torch.device("cpu"), crops=True, threads=1)
    assert calls["n"] == len(photos) and torch.equal(first.images, second.images)
    assert first.images.shape[-1] == dd.TRAIN_SIDE_FACTOR * 32


def test_cache_evicts_least_recent_beyond_its_budget():
    cache = dd.TensorCache(max_bytes=250)
    for k in range(3):
        cache.put(("s", k), torch.zeros(100, dtype=torch.uint8))
    assert cache.get(("s", 0)) is None and cache.get(("s", 2)) is not None


def test_crop_boxes_follow_torchvisions_rule():
    boxes = dd.crop_boxes(4000, 64, 48, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all()
    area = w * h / (64 * 48)
    assert area.min() >= dd.TRAIN_SCALE[0] * 0.9 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= dd.TRAIN_RATIO[0] * 0.9 and ratio.max() <= dd.TRAIN_RATIO[1] * 1.1
    assert area.std() > 0.1 and boxes[:, 0].float().std() > 1  # really random: sizes and positions vary


def test_crop_boxes_fall_back_to_a_centred_crop_when_nothing_fits():
    boxes = dd.crop_boxes(50, 1, 40, torch.Generator().manual_seed(0))  # a 1-pixel-high strip
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (h == 1).all() and (w == round(1 * dd.TRAIN_RATIO[1])).all()
    assert (boxes[:, 0] == (40 - w) // 2).all()


def test_augment_crops_resizes_and_flips():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen)
    images = dd.DeviceImages(raw, torch.tensor([0, 1]), CONFIG, crops=True)
    whole = torch.tensor([[0.0, 0, 64, 64], [0, 0, 64, 64]])
    idx = torch.tensor([0, 1])
    plain = dd.augment(images, idx, whole, torch.tensor([False, False]))
    flipped = dd.augment(images, idx, whole, torch.tensor([True, False]))
    assert plain.shape == (2, 3, 32, 32)
    assert torch.equal(flipped[0], plain[0].flip(-1)) and torch.equal(flipped[1], plain[1])
    # a whole-image box is a 2x downscale by area averaging
    expected = images.normalize(F.avg_pool2d(raw.float(), 2).round().to(torch.uint8))
    assert (plain - expected).abs().max() < 0.5 / 255 / min(CONFIG["std"]) + 1e-5
    corner = dd.augment(images, idx[:1], torch.tensor([[0.0, 0, 32, 32]]), torch.tensor([False]))
    assert torch.allclose(corner[0], images.normalize(raw[:1, :, :32, :32])[0], atol=1e-5)


def test_training_batches_are_full_seeded_permutations_and_shard_exactly():
    raw = torch.randint(0, 256, (10, 3, 64, 64), dtype=torch.uint8)
    images = dd.DeviceImages(raw, torch.arange(10), CONFIG, crops=True)

    def epoch(rank, world, seed=3):
        gen = torch.Generator().manual_seed(seed)
        batches = dd.DeviceBatches(images, 4, train=True, num_samples=23, generator=gen, rank=rank, world=world)
        return list(batches), len(batches)

    whole, n = epoch(0, 1)
    assert n == len(whole) == math.ceil(23 / 4) and all(len(y) == 4 for _, y in whole)
    labels = torch.cat([y for _, y in whole])
    assert sorted(labels[:10].tolist()) == list(range(10))  # the first pass is a permutation
    halves = [epoch(r, 2)[0] for r in range(2)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][b][1], halves[1][b][1]]), y)
        assert torch.allclose(torch.cat([halves[0][b][0], halves[1][b][0]]), x)
    again, _ = epoch(0, 1)
    other, _ = epoch(0, 1, seed=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again, strict=True))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(whole, other, strict=True))


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (17, 1)])
def test_evaluation_shards_cover_every_sample_once(n, world):
    images = dd.DeviceImages(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n), CONFIG, crops=False)
    seen = [
        i
        for r in range(world)
        for _, y in dd.DeviceBatches(images, 3, train=False, rank=r, world=world)
        for i in y.tolist()
    ]
    assert seen == list(range(n))
    assert [shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0] for r in range(world)] == [
        len(range(n)[r::world]) for r in range(world)
    ]


# 4 shots x 7 classes = 28 images: batches of 4 are all full in both pipelines
DATA = ["--shots", "4", "--test", "sketch=builtin:pacs-mini/sketch", "--batch-size", "4", "--steps", "10"]


def test_device_pipeline_trains_like_the_workers_pipeline(tmp_path, device):
    """With --augment none and full batches nothing random differs: same order, same inputs, same result
    (in float32 on a GPU too, where bf16 autocast would round the inputs' last-bit differences up)."""
    runs = {}
    for pipeline in ("workers", "device"):
        out = tmp_path / pipeline
        args = ["fit", "--out", str(out), *TINY, *DATA, "--device", device, "--precision", "fp32", "--augment", "none"]
        assert main([*args, "--input-pipeline", pipeline, "--method", "cyclic", "--lambda", "auto"]) == 0
        runs[pipeline] = out
    a, b = (load_file(runs[p] / rd.ADAPTER) for p in ("workers", "device"))
    assert a.keys() == b.keys()
    assert max_diff(a, b) < 1e-5 < max_diff(a, load_file(runs["workers"] / rd.BASE))
    ma, mb = (json.loads((runs[p] / rd.METRICS).read_text()) for p in ("workers", "device"))
    assert ma["test"]["sketch"]["accuracy"] == mb["test"]["sketch"]["accuracy"]
    assert ma["val"]["n"] == mb["val"]["n"]
    assert "input pipeline: device" in (runs["device"] / "train.log").read_text()


def test_device_pipeline_with_crops_resumes_bit_identically(tmp_path, monkeypatch, device):
    import lnshift.training.loop as loop

    args = [*TINY, *DATA, "--device", device, "--input-pipeline", "device", "--method", "lp-ln"]
    assert main(["fit", "--out", str(tmp_path / "whole"), *args]) == 0
    calls = {"n": 0}
    real = loop.run_phase

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("lnshift.training.fit.run_phase", interrupted)
    assert main(["fit", "--out", str(tmp_path / "cut"), *args]) == 130
    monkeypatch.setattr("lnshift.training.fit.run_phase", real)
    assert main(["fit", "--out", str(tmp_path / "cut"), *args, "--resume"]) == 0
    a, b = load_file(tmp_path / "whole" / rd.ADAPTER), load_file(tmp_path / "cut" / rd.ADAPTER)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_strong_augment_is_refused_by_the_device_pipeline(capsys):
    assert main(["fit", *TINY, "--input-pipeline", "device", "--augment", "strong"]) == 2
    assert "--augment strong" in capsys.readouterr().err


def test_fast_path_trains_the_same_layernorms_as_the_plain_path(tmp_path, device):
    """Device pipeline + torch.compile (inductor; on a GPU also frozen weights in bf16, the table GELU and its
    Triton kernels) against workers + eager: the same trained tensors."""
    options = {
        "plain": ["--input-pipeline", "workers"],
        "fast": ["--input-pipeline", "device", "--compile", *(["--frozen-dtype", "bf16"] if device == "cuda" else [])],
    }
    plain, fast = (
        load_file(_fit(tmp_path / name, "--device", device, *extra, "--augment", "none", "--method", "ln") / rd.ADAPTER)
        for name, extra in options.items()
    )
    diff, moved = max_diff(plain, fast), max_diff(plain, load_file(tmp_path / "plain" / rd.BASE))
    # float32 on the CPU: equal to rounding. bf16 autocast on a GPU: where a gradient is ~0 Adam turns rounding
    # into a step the other way, so the paths need only agree far better than training moved the values (an
    # H200: 3.5e-4 apart, moved 4.2e-3); a wrong gradient or step moves them as far as training does
    assert moved > 1e-3 and diff < (1e-5 if device == "cpu" else moved / 3), f"{diff:.2e} apart, moved {moved:.2e}"


def _fit(out, *extra):
    assert main(["fit", "--out", str(out), *TINY, *DATA, *extra]) == 0
    return out


def test_frozen_weights_in_bf16_train_and_reload(tmp_path, device):
    """--frozen-dtype bf16: frozen weights stored in bf16, trained tensors float32, the saved run reloads as trained."""
    from lnshift.analyses.saved_run import load_run
    from lnshift.training.evaluate import evaluate
    from lnshift.training.ingredients import loader, prepare_data

    args = ["--device", device, "--precision", "bf16", "--frozen-dtype", "bf16", "--input-pipeline", "device"]
    out = _fit(tmp_path / "bf16", *args)
    adapter = load_file(out / rd.ADAPTER)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert "frozen weights stored in bf16" in (out / "train.log").read_text()
    saved = load_run(out)
    dtypes = {n: p.dtype for n, p in saved.model.named_parameters()}
    assert {dtypes[n] for n in adapter} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in adapter} == {torch.bfloat16}
    data = prepare_data(saved.cfg, saved.model.backbone.data_config)
    at = torch.device(device)
    val = evaluate(saved.model.to(at), loader(data.val, saved.cfg, train=False), len(data.classes), at, "bf16")
    assert val["accuracy"] == json.loads((out / rd.METRICS).read_text())["val"]["accuracy"]


def test_frozen_bf16_without_bf16_autocast_is_refused(capsys):
    assert main(["fit", *TINY, "--frozen-dtype", "bf16", "--precision", "fp32"]) == 2
    assert "--frozen-dtype bf16 needs bf16 autocast" in capsys.readouterr().err


def test_images_reach_the_device_in_chunks_with_the_same_result(photos):
    preprocess = dd.eval_preprocess(CONFIG)
    whole = dd.preprocessed_images(photos, preprocess, "k", 2, torch.device("cpu"))
    chunked = dd.preprocessed_images(photos, preprocess, "k", 2, torch.device("cpu"), chunk=3)
    assert len(photos) > 3 and whole.shape == (len(photos), 3, 32, 32) and torch.equal(whole, chunked)


def test_images_of_different_sizes_are_refused(photos):
    sizes = iter([8, 16] * len(photos))

    def ragged(image):
        return dd.transforms.PILToTensor()(image.resize((next(sizes), 8)))

    with pytest.raises(ConfigError, match="different sizes"):
        dd.preprocessed_images(photos, ragged, "ragged", 1, torch.device("cpu"), chunk=1)


def test_auto_pipeline_uses_the_device_when_the_images_fit_its_share_of_free_memory(monkeypatch):
    from types import SimpleNamespace

    from lnshift.config import FitConfig
    from lnshift.training.ingredients import DEVICE_DATA_SHARE_ENV, input_pipeline

    data = SimpleNamespace(named=lambda: {"train": [0] * 10})  # 10 x 3 x 64 x 64 = 122,880 bytes to hold
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (200_000, 10**9))
    cfg, gpu = FitConfig(), torch.device("cuda")
    assert input_pipeline(cfg, data, gpu, CONFIG) == "workers"  # over half of the free memory
    monkeypatch.setenv(DEVICE_DATA_SHARE_ENV, "0.9")
    assert input_pipeline(cfg, data, gpu, CONFIG) == "device"
    assert input_pipeline(cfg, data, torch.device("cpu"), CONFIG) == "workers"


def test_a_global_batch_smaller_than_the_process_count_is_refused(monkeypatch):
    from lnshift.config import FitConfig
    from lnshift.training.ingredients import loader

    images = dd.DeviceImages(torch.zeros(8, 3, 64, 64, dtype=torch.uint8), torch.arange(8), CONFIG, crops=True)
    monkeypatch.setattr("lnshift.training.ingredients.dist.world", lambda: 4)
    with pytest.raises(ConfigError, match="--batch-size 2 is smaller than the 4 data-parallel processes"):
        loader(images, FitConfig.from_dict({"batch_size": 2}), train=True)
    cfg = FitConfig.from_dict({"batch_size": 4, "min_epoch_steps": 1})  # 8 images: an epoch of 2 batches of 4
    assert len(loader(images, cfg, train=True, generator=torch.Generator())) == 2


def test_crop_kernel_matches_roi_align(device):
    """The CUDA path's Triton kernel (on the CPU run by Triton's interpreter) against the roi_align path."""
    pytest.importorskip("triton")
    script = """
import sys
import torch
from lnshift.data import device as dd
from lnshift.data.crop_kernel import resized_crops
dev = torch.device(sys.argv[1])
gen = torch.Generator().manual_seed(0)
config = {"input_size": (3, 24, 20), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
raw = torch.randint(0, 256, (5, 3, 48, 44), dtype=torch.uint8, generator=gen)
images = dd.DeviceImages(raw, torch.arange(5), config, crops=True)
boxes = dd.crop_boxes(12, 48, 44, gen)
boxes[0] = torch.tensor([0.0, 0, 44, 48])  # the whole image: sampling grids of 2 reach the far edges
boxes[1] = torch.tensor([43.0, 47, 44, 48])  # one pixel in the corner
idx = torch.randint(0, 5, (12,), generator=gen)
flips = torch.rand(12, generator=gen) < 0.5
expected = dd.roi_align_crops(images, idx, boxes, flips)
args = [t.to(dev) for t in (raw, idx, boxes, flips)]
ours = resized_crops(*args, (24, 20), images.mean.to(dev), images.std.to(dev)).cpu()
assert ours.shape == expected.shape == (12, 3, 24, 20), ours.shape
print((ours - expected).abs().max().item())
"""
    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if device == "cpu" else {})}
    run = [sys.executable, "-c", script, device]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # one float32 ulp in a sampling coordinate (the GPU contracts multiply-adds) moves a value at a sharp edge of
    # these random images by up to ~2e-5; a wrong pixel, flip or normalisation by ~1
    assert float(done.stdout.split()[-1]) < 5e-5
