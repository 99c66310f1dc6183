"""`lnshift sweep`: expansion, results and summary, restart, shards, collect, and clear errors for bad files."""

import csv
import json
import statistics

import pytest
import yaml

from lnshift import rundir as rd
from lnshift.errors import ConfigError
from lnshift.experiments import sweep as sw
from lnshift.experiments import sweep_file as sf
from lnshift.experiments import sweep_results as sr

TINY = {
    "model": "lnshift/test-vit",
    "model_kwargs": {"img_size": 32, "patch_size": 8},
    "min_epoch_steps": 1,
    "workers": 0,
    "progress": False,
    "steps": 4,
    "batch_size": 8,
}


def spec(out):
    return {
        "out": str(out),
        "base": dict(TINY),
        "datasets": {"mini": {"train": "builtin:pacs-mini/photo", "test": {"sketch": "builtin:pacs-mini/sketch"}}},
        "methods": ["lp", "ln", "ln+auto"],
        "regimes": [{"shots": 2}, {"fraction": 1.0}],
        "seeds": [0, 1],
    }


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    sweep = sf.load_sweep(write(root / "sweep.yaml", spec(root / "out")))
    assert sw.run_sweep(sweep, echo=quiet) == sweep.out
    return sweep


def rows(sweep):
    return json.loads((sweep.out / "results.json").read_text())["rows"]


def test_cells_have_stable_ids(tmp_path):
    sweep = sf.load_sweep(write(tmp_path / "s.yaml", spec(tmp_path / "out")))
    cells = sf.cells(sweep)
    assert len(cells) == 1 * 3 * 2 * 2
    assert cells[0].id == "mini/lp/shots2/s0"
    auto = next(c for c in cells if c.method == "ln+auto" and c.regime.fraction == 1.0 and c.seed == 1)
    assert auto.id == "mini/ln+auto/f1/s1" and auto.unit == "mini/ln/f1/s1"
    assert sweep.run_dir(auto.id) == tmp_path / "out" / "runs" / "mini" / "ln+auto" / "f1" / "s1"


def test_results_rows(done):
    results = json.loads((done.out / "results.json").read_text())
    assert results["cells"] == results["done"] == 12 and results["missing"] == []
    assert results["seeds"] == [0, 1] and "torch" in results["environment"]
    assert (done.out / "sweep.yaml").read_text() == done.path.read_text()
    by_id = {r["id"]: r for r in results["rows"]}
    assert len(by_id) == 12
    for r in by_id.values():
        assert r["steps"] == 4 and r["n_train"] == (14 if r["regime"] == "shots2" else 224)  # 2 shots x 7 classes
        assert 0 <= r["val.accuracy"] <= 1 and 0 <= r["test.sketch.accuracy"] <= 1
        assert rd.RunDir(r["run"]).done
    for seed in (0, 1):
        lp, ln = by_id[f"mini/lp/shots2/s{seed}"], by_id[f"mini/ln/shots2/s{seed}"]
        auto = by_id[f"mini/ln+auto/shots2/s{seed}"]
        assert lp["lambda"] is None and lp["fsr_oracle"] is None
        assert ln["lambda"] == 1.0 and ln["fsr_oracle"] > 0 and ln["fsr_est"] is None
        assert auto["fsr_oracle"] == ln["fsr_oracle"]  # the shift of the same trained run
        assert auto["lambda"] == json.loads((done.run_dir(auto["id"]) / rd.LAMBDA).read_text())["lambda"]
        assert by_id[f"mini/ln/f1/s{seed}"]["fsr_oracle"] == pytest.approx(1.0)  # the reference itself
        assert "shift_ln" not in lp and auto["shift_ln"] == ln["shift_ln"] > 0  # learned before lambda
        assert ln["shift_ln"] == pytest.approx(ln["shift_gamma"] + ln["shift_beta"])
        ref = by_id[f"mini/ln/f1/s{seed}"]
        assert ln["fsr_oracle"] == pytest.approx(ln["shift_gamma"] / ref["shift_gamma"])  # the oracle's own shifts
    with open(done.out / "results.csv") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == [r["id"] for r in results["rows"]]


def test_summary_is_mean_and_std_over_seeds(done):
    groups = json.loads((done.out / "summary.json").read_text())["groups"]
    assert len(groups) == 3 * 2
    table = rows(done)
    for g in groups:
        members = [
            r for r in table if (r["dataset"], r["method"], r["regime"]) == (g["dataset"], g["method"], g["regime"])
        ]
        assert g["n"] == len(members) == 2 and g["seeds"] == [0, 1]
        for key in ("val.accuracy", "test.sketch.accuracy"):
            values = [r[key] for r in members]
            assert g["metrics"][key]["mean"] == pytest.approx(statistics.fmean(values))
            assert g["metrics"][key]["std"] == pytest.approx(statistics.stdev(values))
    with open(done.out / "summary.csv") as fh:
        flat = list(csv.DictReader(fh))
    assert float(flat[0]["test.sketch.accuracy.mean"]) == pytest.approx(
        groups[0]["metrics"]["test.sketch.accuracy"]["mean"]
    )


def test_summary_leaves_out_non_finite_values_and_has_no_std_for_one():
    cell = {"dataset": "d", "method": "ln", "regime": "f1"}
    rows = [{**cell, "seed": s, "acc": v, "loss": w} for s, v, w in [(0, 0.5, 1.0), (1, float("nan"), float("inf"))]]
    stats = sr.summarize(rows)[0]["metrics"]
    assert stats["acc"] == {"mean": 0.5, "std": None, "n": 1} and stats["loss"] == {"mean": 1.0, "std": None, "n": 1}


def test_rerun_skips_finished_cells_and_resumes_the_rest(done, monkeypatch):
    calls = []
    real_fit, real_rescale = sw.fit, sw.rescale_run
    monkeypatch.setattr(
        sw,
        "fit",
        lambda cfg, echo=None: calls.append(("fit", cfg.runtime.out, cfg.runtime.resume)) or real_fit(cfg, echo=None),
    )
    monkeypatch.setattr(
        sw, "rescale_run", lambda *a, **k: calls.append(("rescale", str(k["out"]))) or real_rescale(*a, **k)
    )
    sw.run_sweep(done, echo=quiet)
    assert calls == []

    untouched = done.run_dir("mini/ln/shots2/s0") / rd.METRICS
    mtime = untouched.stat().st_mtime_ns
    (done.run_dir("mini/lp/shots2/s1") / rd.DONE).unlink()  # as if killed before it finished
    (done.run_dir("mini/ln+auto/f1/s0") / rd.DONE).unlink()
    sw.run_sweep(done, echo=quiet)
    assert calls == [
        ("fit", str(done.run_dir("mini/lp/shots2/s1")), True),
        ("rescale", str(done.run_dir("mini/ln+auto/f1/s0"))),
    ]
    assert untouched.stat().st_mtime_ns == mtime
    assert json.loads((done.out / "results.json").read_text())["done"] == 12


def test_collect_rebuilds_the_same_table(done):
    before = json.dumps(rows(done))
    for name in ("results.json", "results.csv", "summary.json", "summary.csv"):
        (done.out / name).unlink()
    collected = sr.collect(done, echo=None)
    assert json.dumps(collected["rows"]) == before == json.dumps(rows(done))
    assert (done.out / "summary.csv").is_file()


def test_shards_are_disjoint_cover_all_cells_and_keep_units_whole(tmp_path, monkeypatch):
    sweep = sf.load_sweep(write(tmp_path / "s.yaml", spec(tmp_path / "out")))
    cells = sf.cells(sweep)
    one, two = sf.shard_cells(cells, (1, 2)), sf.shard_cells(cells, (2, 2))
    assert one and two and not set(one) & set(two) and set(one) | set(two) == set(cells)
    assert not {c.unit for c in one} & {c.unit for c in two}  # ln and ln+auto of a run stay together
    assert sf.shard_cells(cells, (1, 2)) == one  # deterministic
    assert sf.parse_shard("2/8") == (2, 8)
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            sf.parse_shard(bad)

    trained, rescaled = [], []

    def fake_fit(cfg, echo=None):
        trained.append(cfg.runtime.out)
        rd.RunDir(cfg.runtime.out).prepare(resume=False, overwrite=False)
        rd.RunDir(cfg.runtime.out).mark_done()

    def fake_rescale(path, lam, *, out, **kw):
        rescaled.append(str(out))
        rd.RunDir(out).prepare(resume=False, overwrite=False)
        rd.RunDir(out).mark_done()

    monkeypatch.setattr(sw, "fit", fake_fit)
    monkeypatch.setattr(sw, "rescale_run", fake_rescale)
    sw.run_sweep(sweep, shard=(2, 2), echo=quiet)
    assert sorted(trained) == sorted({str(sweep.run_dir(c.unit)) for c in two})
    assert sorted(rescaled) == sorted(str(sweep.run_dir(c.id)) for c in two if c.rescale)
    assert not (sweep.out / "results.csv").exists()  # shards leave collecting to --collect


def test_cyclic_kx_and_its_rescaled_variant_are_sweep_methods(tmp_path):
    data = spec(tmp_path / "out")
    data["methods"] = ["cyclic", "cyclic-kx", "cyclic-kx+auto"]
    sweep = sf.load_sweep(write(tmp_path / "s.yaml", data))
    cell = next(c for c in sf.cells(sweep) if c.method == "cyclic-kx+auto")
    assert (cell.unit, sweep.fit_config(cell).method.name) == ("mini/cyclic-kx/shots2/s0", "cyclic-kx")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda s: s.pop("seeds"), "seeds"),
        (lambda s: s.update(epochs=3), "epochs"),
        (lambda s: s.update(methods=["ln", "magic"]), "methods"),
        (lambda s: s.update(methods=["lp+auto"]), "methods"),
        (lambda s: s.update(methods=["ln+best"]), "methods"),
        (lambda s: s.update(methods=["cyclic-3x"]), "methods"),
        (lambda s: s.update(regimes=[{"fraction": 1.5}]), "regimes[0].fraction"),
        (lambda s: s.update(regimes=[{"shots": 2}, {"epochs": 3}]), "regimes[1]"),
        (lambda s: s.update(seeds=[0, 0]), "seeds"),
        (lambda s: s["base"].update(seed=3), "base.seed"),
        (lambda s: s["base"].update(batch_sise=3), "base.batch_sise"),
        (lambda s: s["base"].update(batch_size=0), "base"),
        (lambda s: s["datasets"]["mini"].pop("train"), "datasets.mini.train"),
        (lambda s: s["datasets"]["mini"].update(fraction=0.5), "datasets.mini.fraction"),
        (lambda s: s["datasets"]["mini"].update(test=["a"]), "datasets.mini.test"),
        (lambda s: s.update(datasets={"bad/name": {"train": "x"}}), "datasets.bad/name"),
        (lambda s: s.update(search={"seed": [1, 2]}), "search.seed"),
        (lambda s: s.update(search={"ln": {"seed": [1]}}), "search.ln"),
        (lambda s: s["base"].update(search={"lr": [0.1]}), "base.search"),
    ],
)
def test_bad_sweep_files_name_the_key_and_file(tmp_path, change, key):
    data = spec(tmp_path / "out")
    change(data)
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as err:
        sf.load_sweep(path)
    assert f"{path}: {key}" in str(err.value)


def test_datasets_option_runs_only_those_cells(tmp_path, monkeypatch):
    data = spec(tmp_path / "out")
    data["datasets"]["other"] = {"train": "builtin:pacs-mini/cartoon"}
    data["methods"], data["regimes"], data["seeds"] = ["lp"], [{"shots": 2}], [0]
    sweep = sf.load_sweep(write(tmp_path / "s.yaml", data))
    trained = []
    monkeypatch.setattr(sw, "_run_unit", lambda sweep, unit, *a: trained.append(unit))
    sw.run_sweep(sweep, echo=quiet, datasets=["other"])
    assert trained == ["other/lp/shots2/s0"]
    with pytest.raises(ConfigError, match="--datasets nope: not in"):
        sw.run_sweep(sweep, echo=quiet, datasets=["nope"])


def test_methods_option_runs_only_those_cells(tmp_path, monkeypatch):
    data = spec(tmp_path / "out")
    data["methods"], data["regimes"], data["seeds"] = ["lp", "ln", "ln+auto"], [{"shots": 2}], [0]
    sweep = sf.load_sweep(write(tmp_path / "s.yaml", data))
    trained = []
    monkeypatch.setattr(sw, "_run_unit", lambda sweep, unit, *a: trained.append(unit))
    sw.run_sweep(sweep, echo=quiet, methods=["ln+auto"])
    assert trained == ["mini/ln/shots2/s0"]  # the variant's unit trains its base run
    with pytest.raises(ConfigError, match="--methods full: not in"):
        sw.run_sweep(sweep, echo=quiet, methods=["full"])


def test_the_worker_queue_starts_with_the_units_that_estimate_fsr(tmp_path):
    data = spec(tmp_path / "out")
    data["methods"] = ["lp", "ln", "ln+fsr"]
    sweep = sf.load_sweep(write(tmp_path / "s.yaml", data))
    units: dict[str, list] = {}
    for cell in sf.cells(sweep):
        units.setdefault(cell.unit, []).append(cell)
    jobs = [sw.Job(str(k), unit, members) for k, (unit, members) in enumerate(units.items())]
    order = [job.unit for job in sw.heaviest_first(jobs)]
    heavy = [u for u in order if "/ln/" in u]
    assert order[: len(heavy)] == heavy and len(heavy) == 4  # the ln units (with ln+fsr) lead
    assert [u for u in order if "/lp/" in u] == [j.unit for j in jobs if "/lp/" in j.unit]  # stable otherwise
