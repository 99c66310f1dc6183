"""Batched multi-run training: R runs in one batch equal the same runs trained one by one with loop.run_phase."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lnshift.backbones import load_backbone
from lnshift.config import FitConfig
from lnshift.errors import ConfigError, ModelError
from lnshift.training.batched import diverged, initial_states, run_logits, train_alone, train_runs
from lnshift.training.blockwise import batched_layernorms
from lnshift.training.ingredients import build_model
from tiny import max_diff

TINY = {"img_size": 32, "patch_size": 8}
CPU = torch.device("cpu")
RUNS, BATCH, CLASSES = 3, 4, 3


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("lnshift/test-vit", pretrained=False, model_kwargs=TINY)


@pytest.fixture(scope="module")
def backbone64():
    return load_backbone("lnshift/test-vit", pretrained=False, model_kwargs=TINY).double()


def config(**kw) -> FitConfig:
    """A short, fast-moving schedule with warm-up and label smoothing, so every setting takes part."""
    base = {"model": "lnshift/test-vit", "model_kwargs": TINY, "steps": 8, "lr": 1e-2, "warmup": 0.25}
    return FitConfig.from_dict({**base, "label_smoothing": 0.1} | kw)


def batch(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Different images and labels for every run and step."""
    gens = [torch.Generator().manual_seed(1000 * r + step) for r in range(RUNS)]
    return [
        (torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)) for g in gens
    ]


def train_both(backbone, cfg: FitConfig, dtype: torch.dtype) -> tuple[list[dict], list[dict], list[dict]]:
    """Initial states, the runs trained together, and the same runs trained alone with loop.run_phase."""
    model = build_model(cfg, backbone, CLASSES).to(dtype)
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    starts = [{k: v.to(dtype) for k, v in s.items()} for s in initial_states(cfg, backbone, CLASSES, seeds=[0, 1, 2])]

    def batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.to(dtype), y) for x, y in batch(step)]

    batched = train_runs(model, starts, batches, cfg, CPU)
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())  # the model is left as it was
    alone = [train_alone(model, starts[r], lambda step, r=r: batches(step)[r], cfg, CPU) for r in range(RUNS)]
    return starts, batched, alone


@pytest.mark.parametrize(
    ("method", "head"),
    [("ln", "linear"), ("cyclic", "linear"), ("cyclic-kx", "linear"), ("lp-ln", "mlp"), ("lp", "linear")],
)
def test_batched_runs_equal_runs_one_by_one(backbone64, method, head):
    """In float64, so that Adam's normalised step cannot turn rounding noise into a sign flip (see the fp32 test)."""
    cfg = config(method=method, cycles=2, head=head, head_hidden=16)
    starts, batched, alone = train_both(backbone64, cfg, torch.float64)
    assert "head.net.0.weight" in batched[0] if head == "mlp" else "head.fc.weight" in batched[0]
    assert ("backbone.model.blocks.0.norm1.weight" in batched[0]) == (method != "lp")
    for r in range(RUNS):
        assert list(alone[r]) == list(batched[r])
        for k in alone[r]:
            assert torch.allclose(batched[r][k], alone[r][k], atol=1e-10), (r, k)
    for k in batched[0]:  # the test can fail: every tensor moved, and the runs differ
        assert all((b[k] - s[k]).abs().max() > 1e-3 for b, s in zip(batched, starts, strict=True)), k
        assert (batched[0][k] - batched[1][k]).abs().max() > 1e-4, k


def test_runs_with_their_own_learning_rates_equal_each_run_alone(backbone64):
    """A learning-rate grid in one pass: one optimiser and schedule per value, runs of one value interleaved."""
    cfg = config(method="cyclic", cycles=1)
    model = build_model(cfg, backbone64, CLASSES).double()
    starts = [{k: v.double() for k, v in s.items()} for s in initial_states(cfg, backbone64, CLASSES, seeds=[0, 1, 2])]

    def batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.double(), y) for x, y in batch(step)]

    lrs = [1e-2, 1e-1, 1e-2]
    batched = train_runs(model, starts, batches, cfg, CPU, lrs)
    for r, lr in enumerate(lrs):
        alone = train_alone(model, starts[r], lambda step, r=r: batches(step)[r], cfg.replace(lr=lr), CPU)
        assert max_diff(alone, batched[r]) < 1e-10, r
    same_start = train_runs(model, [starts[0]] * 2, lambda step: batches(step)[:1] * 2, cfg, CPU, [1e-2, 1e-1])
    assert max_diff(same_start[0], same_start[1]) > 1e-3  # the learning rate made a difference


def test_a_diverged_run_harms_no_other(backbone):
    cfg = config(method="ln")
    model = build_model(cfg, backbone, CLASSES)
    starts = initial_states(cfg, backbone, CLASSES, seeds=[0, 1, 2])
    norm = "backbone.model.blocks.0.norm1.weight"
    starts[1] = {**starts[1], norm: torch.full_like(starts[1][norm], float("nan"))}
    batched = train_runs(model, starts, batch, cfg, CPU)
    assert diverged(batched) == [1]
    alone = train_alone(model, starts[2], lambda step: batch(step)[2], cfg, CPU)
    assert max_diff(alone, batched[2]) < 1e-4


def test_fp32_runs_match_up_to_rounding(backbone):
    """In fp32 the batch shapes round differently; where a gradient is ~0 Adam may amplify that to a step of
    ~lr, so nearly all (not all) values agree to 1e-5."""
    starts, batched, alone = train_both(backbone, config(method="cyclic", cycles=2), torch.float32)
    diffs = torch.cat([(b[k] - a[k]).abs().flatten() for b, a in zip(batched, alone, strict=True) for k in a])
    assert (diffs <= 1e-5).float().mean() > 0.999 and diffs.max() < 0.05
    assert all((b[k] - s[k]).abs().max() > 1e-3 for b, s in zip(batched, starts, strict=True) for k in s)


@pytest.mark.parametrize("head", ["linear", "mlp", "attention"])
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's attention fallback on the CPU
def test_run_logits_equal_each_run_alone(backbone, head):
    cfg = config(method="ln", head=head, head_hidden=16)
    model = build_model(cfg, backbone, CLASSES).eval()
    gen = torch.Generator().manual_seed(0)
    states = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in s.items()}
        for s in initial_states(cfg, backbone, CLASSES, seeds=[0, 1])
    ]
    x = torch.randn(5, 3, 32, 32, generator=gen)
    logits = run_logits(model, states, x, CPU, "fp32")
    assert logits.shape == (2, 5, CLASSES)
    for r, state in enumerate(states):
        alone = build_model(cfg, backbone, CLASSES).eval()
        alone.load_state_dict({**alone.state_dict(), **state})
        with torch.no_grad():
            assert torch.allclose(logits[r], alone(x), atol=1e-5), r
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["lnshift/test-vit", "test_vit4"])  # LayerNorm; timm RmsNorm
def test_one_variant_patch_equals_the_plain_model(name):
    backbone = load_backbone(name, pretrained=False, model_kwargs=TINY)
    norms = list(backbone.norm_modules(include_rms=True))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = backbone(x)
        with batched_layernorms(backbone, norms, {}, 1):
            patched = backbone(x)
    assert torch.allclose(plain, patched, atol=1e-5)
    with pytest.raises(ModelError, match="cannot be batched"), batched_layernorms(backbone, [""], {}, 1):
        pass


def test_bf16_autocast_trains(backbone):
    cfg = config(method="cyclic", cycles=1, steps=4, precision="bf16")
    model = build_model(cfg, backbone, CLASSES)
    starts = initial_states(cfg, backbone, CLASSES, seeds=[0, 1, 2])
    batched = train_runs(model, starts, batch, cfg, CPU)
    alone = train_alone(model, starts[1], lambda step: batch(step)[1], cfg, CPU)
    assert all(torch.isfinite(t).all() for t in batched[1].values())
    assert max_diff(alone, batched[1]) < 0.05


@pytest.mark.parametrize(
    ("change", "message"), [({"method": "full"}, "train only"), ({"steps": None}, "fixed step budget")]
)
def test_refuses_what_it_cannot_batch(backbone, change, message):
    cfg = config().replace(**change)
    with pytest.raises(ConfigError, match=message):
        train_runs(build_model(cfg, backbone, CLASSES), [], batch, cfg, CPU)


# ---------------------------------------------------------------- fit_batched and sweep --batched


def batched_sweep(tmp_path, methods, name="s", device="cpu"):
    from lnshift.experiments import sweep_file as sf

    data = {
        "out": str(tmp_path / name),
        "base": {
            "model": "lnshift/test-vit",
            "model_kwargs": {"img_size": 32, "patch_size": 8},
            "steps": 6,
            "batch_size": 8,
            "select": "last",
            "input_pipeline": "device",
            "progress": False,
            "device": device,
            "precision": "fp32",  # on a GPU too: bf16 autocast would turn reduction-order noise into Adam sign flips
        },
        "datasets": {"mini": {"train": "builtin:pacs-mini/photo", "test": {"sketch": "builtin:pacs-mini/sketch"}}},
        "methods": methods,
        "regimes": [{"shots": 2}, {"fraction": 1.0}],
        "seeds": [0, 1],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return sf.load_sweep(path)


def test_sweep_batched_writes_every_run_directory_and_the_table(tmp_path, device):
    from lnshift import rundir as rd
    from lnshift.analyses.saved_run import load_run
    from lnshift.experiments import sweep as sw
    from lnshift.training.evaluate import evaluate
    from lnshift.training.ingredients import loader, prepare_data

    sweep = batched_sweep(tmp_path, ["lp", "ln", "ln+auto", "cyclic"], device=device)
    sw.run_sweep(sweep, echo=lambda _: None, batched=True)
    results = json.loads((sweep.out / "results.json").read_text())
    assert results["done"] == results["cells"] == 4 * 2 * 2
    run = sweep.run_dir("mini/ln/f1/s1")
    config = yaml.safe_load((run / rd.CONFIG).read_text())
    # the random test backbone differs per seed, so each seed's 2 regimes were batched together
    assert len(config["batched"]["with"]) == 2 and config["fit"]["optim"]["seed"] == 1
    fast_paths = [] if device == "cpu" else ["patch_matmul", "table_gelu", "class_token"]  # `auto` trains fast on CUDA
    assert config["resolved"] == {"fast_paths": fast_paths, "input_pipeline": "device"}
    saved = load_run(run)  # the run directory contract holds: it loads back and scores as saved
    data = prepare_data(saved.cfg, saved.model.backbone.data_config)
    at, val_split = torch.device(device), loader(data.val, saved.cfg, train=False)
    val = evaluate(saved.model.to(at), val_split, len(data.classes), at, saved.cfg.optim.precision)
    assert val["accuracy"] == json.loads((run / rd.METRICS).read_text())["val"]["accuracy"]
    lam = json.loads((sweep.run_dir("mini/ln+auto/f1/s1") / rd.LAMBDA).read_text())
    assert lam["selected_on"] == "val"


def test_sweep_searches_learning_rates_in_the_batched_pass(tmp_path, device, monkeypatch):
    """Every candidate of every cell trains in the batched pass; each cell's run is its chosen candidate."""
    from lnshift import rundir as rd
    from lnshift.experiments import sweep as sw
    from lnshift.training import search

    sweep = batched_sweep(tmp_path, ["lp", "ln", "ln+auto"], device=device)
    sweep.search.update({"lr": [0.01, 0.1], "lp": {"lr": [0.03]}})
    monkeypatch.setattr(
        search, "train_run", lambda *a, **k: pytest.fail("a candidate trained outside the batched pass")
    )
    sw.run_sweep(sweep, echo=lambda _: None, batched=True)
    rows = {r["id"]: r for r in json.loads((sweep.out / "results.json").read_text())["rows"]}
    assert len(rows) == 3 * 2 * 2
    for cell, row in rows.items():
        method = cell.split("/")[1]
        assert row["lr_grid"] == ("0.03" if method == "lp" else "0.01 0.1") and str(row["lr"]) in [
            "0.03",
            "0.01",
            "0.1",
        ]
        unit = sweep.run_dir(cell.replace("ln+auto", "ln"))
        chosen = json.loads((unit / search.SEARCH_JSON).read_text())
        assert chosen["chosen"] == {"lr": row["lr"]}
        picked = load_file(
            unit
            / chosen["candidates"][[c["values"] for c in chosen["candidates"]].index(chosen["chosen"])]["run"]
            / rd.ADAPTER
        )
        assert all(torch.equal(t, load_file(unit / rd.ADAPTER)[k]) for k, t in picked.items())
    assert rows["mini/ln/shots2/s0"]["fsr_oracle"] is not None  # against the chosen run of fraction 1.0
    assert json.loads((sweep.run_dir("mini/ln+auto/f1/s0") / rd.LAMBDA).read_text())["source_run"] == str(
        sweep.run_dir("mini/ln/f1/s0")
    )


def test_learning_rate_candidates_in_one_pass_are_the_runs_fit_makes(tmp_path, device):
    """Candidates share their data and batches; each is still the run `fit` makes at its learning rate."""
    from lnshift.experiments import sweep_file as sf
    from lnshift.pipeline import fit
    from lnshift.training.multirun import fit_batched

    sweep = batched_sweep(tmp_path, ["ln"], device=device)
    cell = sf.cells(sweep)[0]
    cfgs = [sweep.fit_config(cell).replace(lr=lr, out=str(tmp_path / f"lr{lr}")) for lr in (0.01, 0.1)]
    together = fit_batched(cfgs, torch.device(device))
    for cfg, run in zip(cfgs, together, strict=True):
        alone = fit(cfg.replace(out=str(tmp_path / f"fit{cfg.optim.lr}")), echo=None)
        a, b = (load_file(r.path / "adapter.safetensors") for r in (run, alone))
        assert max_diff(a, b) < 1e-4, cfg.optim.lr
    a, b = (load_file(r.path / "adapter.safetensors") for r in together)
    assert max_diff(a, b) > 1e-3


def test_a_candidate_that_diverges_in_the_batched_pass_is_a_failed_candidate(tmp_path, monkeypatch):
    from lnshift import rundir as rd
    from lnshift.experiments import sweep_file as sf
    from lnshift.pipeline import fit
    from lnshift.training import multirun
    from lnshift.training.search import SEARCH_JSON, candidate_config, candidates

    real = multirun.train_runs

    def nan_for_the_largest(model, starts, batch, cfg, device, lrs):
        states = real(model, starts, batch, cfg, device, lrs)
        return [
            {k: t * float("nan") for k, t in s.items()} if lr == max(lrs) else s
            for s, lr in zip(states, lrs, strict=True)
        ]

    monkeypatch.setattr(multirun, "train_runs", nan_for_the_largest)
    sweep = batched_sweep(tmp_path, ["ln"])
    cfg = sweep.fit_config(sf.cells(sweep)[0]).replace(search={"lr": [0.01, 0.1]})
    runs = multirun.fit_batched(
        [candidate_config(cfg, v) for v in candidates(cfg.optim.search)], CPU, score_tests=False
    )
    assert [r.done for r in runs] == [True, False] and "NonFiniteLossError" in (runs[1] / rd.FAILED).read_text()
    monkeypatch.setattr(
        "lnshift.training.search.train_run",
        lambda *a, **k: pytest.fail("a candidate was trained again"),
    )
    fit(cfg.replace(resume=True), echo=None)  # as the sweep finishes a cell whose candidates are trained
    result = json.loads((tmp_path / "s" / "runs" / sf.cells(sweep)[0].unit / SEARCH_JSON).read_text())
    assert [c["status"] for c in result["candidates"]] == ["done", "failed"] and result["chosen"] == {"lr": 0.01}


def test_a_run_trained_with_others_equals_it_trained_alone(tmp_path, device):
    from lnshift.experiments import sweep_file as sf
    from lnshift.training.multirun import fit_batched

    sweep = batched_sweep(tmp_path, ["ln"], device=device)
    cfgs = [sweep.fit_config(c) for c in sf.cells(sweep)]
    together = fit_batched(cfgs, torch.device(device))
    alone = fit_batched([cfgs[2].replace(out=str(tmp_path / "alone"))], torch.device(device))[0]
    a, b = (load_file(r.path / "adapter.safetensors") for r in (together[2], alone))
    assert max_diff(a, b) < 1e-5
    assert max_diff(a, load_file(together[0].path / "adapter.safetensors")) > 1e-4  # the runs really differ


@pytest.mark.parametrize(
    ("change", "message"),
    [({"select": "best"}, "select: last"), ({"input_pipeline": "workers"}, "device input pipeline")],
)
def test_batched_runs_refuse_what_fit_would_do_otherwise(tmp_path, change, message):
    from lnshift.experiments import sweep_file as sf
    from lnshift.training.multirun import fit_batched

    sweep = batched_sweep(tmp_path, ["ln"])
    cfgs = [sweep.fit_config(c).replace(**change) for c in sf.cells(sweep)]
    with pytest.raises(ConfigError, match=message):
        fit_batched(cfgs, CPU)


@pytest.mark.parametrize(
    ("method", "options"), [("ln", {}), ("cyclic", {}), ("cyclic-kx", {}), ("ln", {"val_size": "match"})]
)
def test_a_batched_run_is_the_run_fit_makes(tmp_path, method, options, device):
    """Same splits, batches, phases and optimiser steps as `lnshift fit --select last`: the same tensors and metrics."""
    from lnshift import rundir as rd
    from lnshift.experiments import sweep_file as sf
    from lnshift.pipeline import fit
    from lnshift.training.multirun import fit_batched

    sweep = batched_sweep(tmp_path, [method], device=device)
    cfgs = [sweep.fit_config(c).replace(**options) for c in sf.cells(sweep) if c.seed == 0]  # both regimes
    together = fit_batched(cfgs, torch.device(device))
    batched, alone = together[0], fit(cfgs[0].replace(out=str(tmp_path / "fit")), echo=None)
    a, b = (load_file(r.path / "adapter.safetensors") for r in (batched, alone))
    assert max_diff(a, b) < 1e-4 < max_diff(a, load_file(alone.path / "base.safetensors"))
    ma, mb = (json.loads((r.path / "metrics.json").read_text()) for r in (batched, alone))
    assert ma["test"]["sketch"]["accuracy"] == mb["test"]["sketch"]["accuracy"]
    assert ma["val"]["accuracy"] == mb["val"]["accuracy"]
    sa, sb = (json.loads((r.path / rd.SPLITS).read_text()) for r in (batched, alone))
    assert sa == sb
    ca, cb = (json.loads((r.path / rd.CYCLES).read_text()) for r in (batched, alone))
    assert [p["steps"] for p in ca["phases"]] == [p["steps"] for p in cb["phases"]]
    assert ca["budget"] == cb["budget"] and ca["budget"]["steps"] == 6 * (4 if method == "cyclic-kx" else 1)
    val_size = options.get("val_size", "holdout")
    assert yaml.safe_load((batched.path / rd.CONFIG).read_text())["fit"]["data"]["val_size"] == val_size
    # each run validates on its own data: 2 shots on 2 images per class under match, the full hold-out otherwise
    sizes = [json.loads((r.path / rd.SPLITS).read_text())["validation"]["size"] for r in together]
    assert (sizes[0] < sizes[1]) == (val_size == "match")


def test_runs_with_an_epoch_budget_are_batched_by_length_and_equal_fit(tmp_path, device):
    """With `epochs`, 2 shots and the full split make runs of different lengths: each is still fit's run."""
    from lnshift import rundir as rd
    from lnshift.experiments import sweep_file as sf
    from lnshift.pipeline import fit
    from lnshift.training.multirun import fit_batched

    sweep = batched_sweep(tmp_path, ["cyclic"], device=device)
    cfgs = [
        sweep.fit_config(c).replace(steps=None, epochs=2, min_epoch_steps=1) for c in sf.cells(sweep) if c.seed == 0
    ]
    batched = fit_batched(cfgs, torch.device(device))
    steps = []
    for cfg, run in zip(cfgs, batched, strict=True):
        alone = fit(cfg.replace(out=str(tmp_path / f"fit-{len(steps)}")), echo=None)
        a, b = (load_file(r.path / "adapter.safetensors") for r in (run, alone))
        assert max_diff(a, b) < 1e-4
        ma, mb = (json.loads((r.path / rd.METRICS).read_text()) for r in (run, alone))
        assert ma["test"]["sketch"]["accuracy"] == mb["test"]["sketch"]["accuracy"]
        pa, pb = (json.loads((r.path / rd.CYCLES).read_text())["phases"] for r in (run, alone))
        assert [p["steps"] for p in pa] == [p["steps"] for p in pb]
        steps.append(sum(p["steps"] for p in pa))
    assert steps[0] < steps[1]  # 2 shots per class train for fewer steps than the full split
    for cfg, run in zip(cfgs, batched, strict=True):  # so each trained in a pass of its own
        assert yaml.safe_load((run.path / rd.CONFIG).read_text())["batched"]["with"] == [cfg.runtime.out]
        assert "with 0 other run(s)" in (run.path / rd.LOG).read_text()
