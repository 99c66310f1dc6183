"""Reports: built from tiny real runs and a fixed sweep table, checked as files and as rendered by Chromium."""

import base64
import html
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from scipy import stats

from lnshift import rundir as rd
from lnshift.analyses.saved_run import fsr_of_run
from lnshift.cli import main
from lnshift.report import FIGURES, REPORT, report_main, write_report
from lnshift.report.figures import block_grid
from lnshift.report.html import DISPLAY_SCALE
from lnshift.report.stats import bootstrap_ci, mean_std, paired_compare
from lnshift.training.phases import BUDGETS
from tiny import TINY as TINY_BASE

TINY = [*TINY_BASE, "--shots", "2"]
RUN_SECTIONS = ["summary", "metrics", "shift", "lambda", "cycles", "fsr"]
SWEEP_SECTIONS = ["summary", "results", "comparisons", "figures"]
CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
        if p and os.access(p, os.X_OK)
    ),
    None,
)


class Page(HTMLParser):
    """Sections, images and tables of a report, parsed with the standard library."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tables: list[list[list[str]]] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def table_with(self, header: str) -> list[list[str]]:
        return next(t for t in self.tables if header in t[0])


def decode(img: dict[str, str]) -> tuple[bytes, Image.Image]:
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix)
    data = base64.b64decode(img["src"][len(prefix) :])
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def check_figures(page: Page, folder, names: list[str]) -> None:
    """Every figure decodes, has the size its tag announces, and is the same PNG as the file beside the page."""
    assert [img["data-file"] for img in page.images] == [f"{n}.png" for n in names]
    for img in page.images:
        data, image = decode(img)
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300
        assert (int(img["width"]), int(img["height"])) == tuple(round(v / DISPLAY_SCALE) for v in image.size)
        assert distinct_colours(image.convert("RGB")) > 50  # a drawn figure, not a blank canvas
        assert (folder / FIGURES / img["data-file"]).read_bytes() == data
    assert sorted(p.name for p in (folder / FIGURES).iterdir()) == sorted(f"{n}.png" for n in names)


def check_self_contained(text: str, page: Page) -> None:
    assert not {"script", "link", "iframe", "object"} & page.tags
    assert not re.search(r"(src|href)=\"(https?:|//)", text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny real `ln` run (lambda on validation) and a `cyclic` run with lambda from the FSR estimate."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["fit", *TINY, "--epochs", "2", "--lambda", "auto", "--out", str(root / "ln")]) == 0
    cyclic = ["--method", "cyclic", "--epochs", "4", "--shots", "4", "--lambda", "fsr"]
    cyclic += ["--fsr-subsets", "0.5,0.75", "--fsr-seeds", "1"]  # 3 training-set sizes: 14, 21, 28
    assert main(["fit", *TINY, *cyclic, "--out", str(root / "cyclic")]) == 0
    fsr_of_run(root / "cyclic", root / "ln")  # an oracle FSR (with a budget warning: 4 steps against 2)
    return root


def test_run_report_has_every_section_table_and_figure(runs, tmp_path):
    target = write_report(runs / "ln", out=tmp_path)
    assert target == tmp_path / REPORT
    text = target.read_text()
    page = Page(text)
    assert page.sections == RUN_SECTIONS
    check_self_contained(text, page)
    check_figures(page, tmp_path, ["shift_blocks", "shift_layers", "lambda_curve", "cycles"])

    metrics = json.loads((runs / "ln" / rd.METRICS).read_text())
    rows = page.table_with("accuracy %")
    assert [r[0] for r in rows[1:]] == ["validation", "test: photo", "test: sketch"]
    assert rows[1][2] == f"{100 * metrics['val']['accuracy']:.2f}"
    assert rows[3][2] == f"{100 * metrics['test']['sketch']['accuracy']:.2f}"

    trainable = sum(t.numel() for t in load_file(runs / "ln" / rd.ADAPTER).values())
    assert f"{trainable:,} (LayerNorm" in html.unescape(text)
    assert "event of events.jsonl (2 epochs)" in text and "builtin:pacs-mini/photo" in text
    assert "input pipeline workers, fast paths none" in text  # config.yaml's `resolved` (CPU)
    shift = json.loads((runs / "ln" / rd.SHIFT).read_text())
    assert f"{shift['shift_ln']:.4g}" in text
    assert "backbone.model.norm" in text  # the final norm, outside the blocks, is listed
    assert "No fsr.json" in text


def test_cyclic_report_shows_phases_fsr_and_the_fsr_lambda(runs, tmp_path):
    text = write_report(runs / "cyclic", out=tmp_path).read_text()
    page = Page(text)
    assert page.sections == RUN_SECTIONS
    check_figures(
        page, tmp_path, ["shift_blocks", "shift_layers", "lambda_curve", "cycles", "fsr_blocks", "fsr_estimate"]
    )
    phases = page.table_with("kept epoch")
    assert [r[0] for r in phases[1:]] == ["head-1", "layernorm-1", "head-2", "layernorm-2"]
    assert f"cyclic (K = 2: {BUDGETS['cyclic']})" in text and f"steps in all: {BUDGETS['cyclic']}." in text
    assert "reference_steps" in text and "different schedules" in text  # the oracle's budget warning
    estimate = json.loads((runs / "cyclic" / rd.FSR_ESTIMATE).read_text())
    assert f"{estimate['fsr_est']:.4g}" in text
    assert "training data (FSR estimate)" in text


def test_per_cycle_lambda_gets_its_columns(runs, tmp_path):
    run = shutil.copytree(runs / "cyclic", tmp_path / "run")
    cycles = json.loads((run / rd.CYCLES).read_text())
    for phase in cycles["phases"][1::2]:  # as --lambda-each-cycle records them
        phase.update({"lambda": 1.5, "val_after_lambda": 0.25})
    rd.write_json(run / rd.CYCLES, cycles)
    rows = Page(write_report(run).read_text()).table_with("val after λ %")
    assert [r[-2:] for r in rows[1:]] == [["–", "–"], ["1.5", "25.00"], ["–", "–"], ["1.5", "25.00"]]


def test_report_main_writes_beside_the_run(runs, tmp_path, capsys):
    run = shutil.copytree(runs / "ln", tmp_path / "run")
    assert report_main(str(run)) == run / REPORT
    assert f"report: {run / REPORT}" in capsys.readouterr().out
    assert (run / FIGURES / "lambda_curve.png").is_file()
    assert rd.RunDir(run).done  # the run directory is otherwise untouched


def test_report_of_an_unfinished_run_says_so(runs, tmp_path):
    run = shutil.copytree(runs / "ln", tmp_path / "run")
    for name in (rd.DONE, rd.METRICS, rd.LAMBDA):
        (run / name).unlink()
    page = Page(write_report(run).read_text())
    assert page.sections == RUN_SECTIONS
    text = (run / REPORT).read_text()
    assert "no DONE marker" in text and "No metrics.json" in text and "No lambda.json" in text


def test_report_refuses_a_folder_that_is_neither(tmp_path):
    from lnshift.errors import RunDirError

    with pytest.raises(RunDirError, match="neither a run directory"):
        write_report(tmp_path)


def test_block_grid_reads_timm_hf_and_open_clip_names():
    def layers(names):
        return [{"name": n, "gamma_l2": float(i), "beta_l2": -float(i)} for i, n in enumerate(names)]

    timm = block_grid(
        layers(["m.blocks.0.norm1", "m.blocks.0.norm2", "m.blocks.1.norm1", "m.blocks.1.norm2", "m.norm"])
    )
    assert timm.rows == ["0", "1"] and timm.columns == ["norm1", "norm2"]
    assert timm.gamma.tolist() == [[0, 1], [2, 3]] and [o["name"] for o in timm.others] == ["m.norm"]
    hf = block_grid(layers(["encoder.layer.10.layernorm_before", "encoder.layer.2.layernorm_after"]))
    assert hf.rows == ["2", "10"] and hf.columns == ["layernorm_before", "layernorm_after"]
    assert np.isnan(hf.gamma[0, 0]) and hf.gamma[0, 1] == 1 and hf.beta[1, 0] == 0
    clip = block_grid(layers(["transformer.resblocks.0.ln_1", "ln_pre", "ln_post"]))
    assert clip.columns == ["ln_1"] and len(clip.others) == 2
    staged = block_grid(layers(["stages.0.blocks.1.norm1", "stages.1.blocks.0.attn.q_norm", "layer1.norm"]))
    assert staged.rows == ["stages.0.blocks 1", "stages.1.blocks 0"] and staged.columns == ["norm1", "attn.q_norm"]
    assert [o["name"] for o in staged.others] == ["layer1.norm"]
    assert block_grid(layers(["norm", "fc_norm"])) is None


# ---------------------------------------------------------------- statistics


def test_mean_std_and_bootstrap_interval_against_numpy_and_scipy():
    x = [0.61, 0.64, 0.58, 0.70, 0.66, 0.59, 0.63]
    mean, std = mean_std(x)
    assert mean == pytest.approx(statistics.fmean(x)) and std == pytest.approx(statistics.stdev(x))
    assert mean_std([0.5, math.nan]) == (0.5, pytest.approx(math.nan, nan_ok=True))
    low, high = bootstrap_ci(x)
    ref = stats.bootstrap((np.array(x),), np.mean, method="percentile", n_resamples=20_000, rng=1).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.004) and high == pytest.approx(ref.high, abs=0.004)
    assert bootstrap_ci(x) == (low, high)  # seeded: the same report every time
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_paired_comparison_against_scipy_wilcoxon():
    a = np.array([0.71, 0.64, 0.69, 0.75, 0.66, 0.73, 0.70, 0.68])
    b = np.array([0.69, 0.65, 0.64, 0.70, 0.66, 0.69, 0.61, 0.66])
    r = paired_compare(a, b)
    ref = stats.wilcoxon(a, b)
    assert r.n_pairs == 8 and (r.wins, r.ties, r.losses) == (6, 1, 1)
    assert r.p_value == pytest.approx(ref.pvalue) and r.wilcoxon_stat == pytest.approx(ref.statistic)
    assert r.mean_diff == pytest.approx(np.mean(a - b))
    assert r.ci_low < r.mean_diff < r.ci_high
    # exact null distribution: 6 positive differences, all signs alike, P = 2 / 2^6
    assert paired_compare([1, 2, 3, 4, 5, 6], [0] * 6).p_value == pytest.approx(0.03125)
    same = paired_compare([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same.p_value == 1.0 and same.ties == 3 and same.mean_diff == 0
    dropped = paired_compare([0.5, math.nan, 0.7, 0.8], [0.4, 0.5, math.nan, 0.6])
    assert dropped.n_pairs == 2 and dropped.mean_diff == pytest.approx(0.15)
    with pytest.raises(ValueError, match="differ in length"):
        paired_compare([1, 2], [1])


# ---------------------------------------------------------------- sweeps

DATASETS = {"pacs-art": ["holdout", "photo", "sketch"], "lung": ["holdout"]}
METHODS = {"lp": 0.0, "full": 0.01, "ln": 0.03, "cyclic": 0.04, "ln+auto": 0.035}
REGIMES = [("f0.05", 0.05, None), ("f0.2", 0.2, None), ("f1", 1.0, None), ("shots5", None, 5)]
SEEDS = [0, 1, 2]


def sweep_rows() -> list[dict]:
    """A fixed results table in the shape docs/sweep.md gives; accuracy grows with data and differs by method."""
    rng = np.random.default_rng(0)
    rows = []
    for dataset, tests in DATASETS.items():
        for method, effect in METHODS.items():
            for regime, fraction, shots in REGIMES:
                for seed in SEEDS:
                    base = 0.5 + 0.2 * (fraction or 0.03) ** 0.5 + effect
                    row = {
                        "id": f"{dataset}/{method}/{regime}/s{seed}",
                        "dataset": dataset,
                        "method": method,
                        "regime": regime,
                        "fraction": fraction,
                        "shots": shots,
                        "seed": seed,
                        "lambda": None if method in ("lp", "full") else (1.0 if "+" not in method else 1.25),
                        "fsr_oracle": None if method in ("lp", "full") else 1 / (fraction or 0.03) ** 0.1,
                        "fsr_est": None,
                        "val.accuracy": base + rng.normal(0, 0.01),
                        "val.loss": 1.0,
                    }
                    for i, name in enumerate(tests):
                        row[f"test.{name}.accuracy"] = base - 0.1 * i + rng.normal(0, 0.01)
                        row[f"test.{name}.ece"] = 0.05
                    rows.append(row)
    return rows


@pytest.fixture
def sweep_dir(tmp_path):
    rows = sweep_rows()
    results = {"sweep_file": "bench.yaml", "cells": len(rows) + 1, "done": len(rows), "missing": ["lung/ln/f1/s3"]}
    rd.write_json(tmp_path / "results.json", {**results, "environment": {"torch": "2.14.1"}, "rows": rows})
    rd.write_json(tmp_path / "summary.json", {"sweep_file": "bench.yaml", "sweep": {"seeds": SEEDS}, "groups": []})
    return tmp_path


def test_sweep_report_tables_comparisons_and_figures(sweep_dir):
    text = write_report(sweep_dir).read_text()
    page = Page(text)
    assert page.sections == SWEEP_SECTIONS
    check_self_contained(text, page)
    check_figures(page, sweep_dir, ["sweep_accuracy", "sweep_fsr_lambda"])
    assert "1 cells have not finished: lung/ln/f1/s3" in text
    assert "shots5 are not on the data fraction axis" in text
    assert f"cyclic: {BUDGETS['cyclic']}." in text and "cyclic-kx" not in text  # labels of the methods shown

    rows = sweep_rows()
    results = page.table_with("ID %")
    assert len(results) == 1 + len(DATASETS) * len(METHODS) * len(REGIMES)
    first = [r for r in rows if (r["dataset"], r["method"], r["regime"]) == ("pacs-art", "lp", "f0.05")]
    ood = [(r["test.photo.accuracy"] + r["test.sketch.accuracy"]) / 2 for r in first]
    mean, std = statistics.fmean(ood), statistics.stdev(ood)
    assert results[1][:4] == ["pacs-art", "f0.05", "lp", "3"]
    assert results[1][6].startswith(f"{100 * mean:.1f} ± {100 * std:.1f} [")

    comparisons = page.table_with("Wilcoxon p")
    by_key = {(r[0], r[1], r[2]): r for r in comparisons[1:]}
    assert "(full: the highest mean validation accuracy" in text  # best baseline chosen on validation
    assert {k[2] for k in by_key} == {"ln", "full"}
    cyc = by_key[("ID", "cyclic", "ln")]
    key = lambda r: (r["dataset"], r["regime"], r["seed"])  # noqa: E731
    ln = {key(r): r["test.holdout.accuracy"] for r in rows if r["method"] == "ln"}
    pairs = [(r["test.holdout.accuracy"], ln[key(r)]) for r in rows if r["method"] == "cyclic"]
    a, b = np.array(pairs).T
    assert cyc[3] == str(len(pairs)) == "24"
    assert cyc[4] == f"{100 * np.mean(a - b):+.2f}"
    assert float(cyc[7]) == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-2)
    assert by_key[("OOD", "cyclic", "ln")][3] == "12"  # lung has no OOD test set
    assert ("ID", "ln", "ln") not in by_key and ("ID", "full", "full") not in by_key


def test_sweep_of_test_sets_without_a_holdout_shows_each_by_name(tmp_path):
    rows = [
        {k: v for k, v in r.items() if not k.startswith("test.holdout")} for r in sweep_rows() if r["dataset"] != "lung"
    ]
    rd.write_json(tmp_path / "results.json", {"rows": rows})
    page = Page(write_report(tmp_path).read_text())
    assert page.table_with("photo %")[0][5:7] == ["photo %", "sketch %"]
    assert {r[0] for r in page.table_with("Wilcoxon p")[1:]} == {"photo", "sketch"}


# ---------------------------------------------------------------- in a real browser

PROBE = """<script>
addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const out = {
    height: document.documentElement.scrollHeight,
    images: [...document.images].map((i) => ({file: i.dataset.file, complete: i.complete,
                                              natural: [i.naturalWidth, i.naturalHeight], box: box(i)})),
    tables: [...document.querySelectorAll("table")].filter((t) => !t.closest("details"))
      .map((t) => ({rows: t.rows.length, box: box(t)})),
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.append(pre);
});
</script>"""
WIDTH = 1100


def chromium(tmp_path, *args: str) -> str:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def distinct_colours(image: Image.Image) -> int:
    return len(image.getcolors(maxcolors=1 << 20) or [])


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_chromium(runs, tmp_path):
    """Chromium decodes every figure at its size, lays out the tables, and the screenshot shows the figures."""
    report = write_report(runs / "cyclic", out=tmp_path / "report")
    page = Page(report.read_text())
    probe = tmp_path / "probe.html"  # a copy with a measuring script; the report itself has no script
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, f"--window-size={WIDTH},900", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the page did not finish loading in Chromium"
    layout = json.loads(html.unescape(found.group(1)))

    assert [i["file"] for i in layout["images"]] == [i["data-file"] for i in page.images]
    assert len(layout["tables"]) >= 8 and all(t["rows"] >= 2 and t["box"][3] > 20 for t in layout["tables"])
    height = layout["height"]
    assert 2000 < height < 16000
    shot = tmp_path / "screenshot.png"
    chromium(tmp_path, f"--window-size={WIDTH},{height}", f"--screenshot={shot}", report.as_uri())
    screen = Image.open(shot).convert("RGB")
    assert screen.size == (WIDTH, height)

    for img, tag in zip(layout["images"], page.images, strict=True):
        assert img["complete"] and img["natural"] == list(Image.open(report.parent / FIGURES / img["file"]).size)
        left, top, width, height = (round(v) for v in img["box"])
        assert (width, height) == (int(tag["width"]), int(tag["height"])), img["file"]
        crop = screen.crop((left, top, left + width, top + height))
        assert distinct_colours(crop) > 100, f"{img['file']} rendered blank"
        source = (
            Image.open(report.parent / FIGURES / img["file"]).convert("RGB").resize(crop.size, Image.Resampling.LANCZOS)
        )
        difference = np.abs(np.asarray(crop, dtype=float) - np.asarray(source, dtype=float)).mean()
        assert difference < 12, f"{img['file']} on screen differs from its PNG by {difference:.1f} per channel"
    for t in layout["tables"]:
        left, top, width, height = (round(v) for v in t["box"])
        assert distinct_colours(screen.crop((left, top, left + width, top + height))) > 10  # text was drawn
