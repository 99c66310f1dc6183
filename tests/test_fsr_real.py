"""The FSR estimator against the oracle on real data (PACS art paintings, the bundled CIFAR-10 ViT).

A small run (10 % of the art training pool) and a reference on all of it are tuned with the same
step budget; the oracle FSR is their shift ratio, and the estimate uses only the small run's own
training data. The agreement measured on the GPU at full size is in benchmarks/results/README.md; here the
assertion is deliberately loose (same side of the estimate's error band, within a factor of 2) so the
test checks the pipeline on real images and fails on gross disagreement, not on noise.
"""

import math
from pathlib import Path

import pytest

from lnshift import rundir as rd
from lnshift.analyses.saved_run import estimate_fsr_of_run, fsr_of_run
from lnshift.config import FitConfig
from lnshift.pipeline import fit

PACS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pacs.zip"
pytestmark = pytest.mark.skipif(not PACS.is_file(), reason=f"real data not found at {PACS}")


def test_estimated_fsr_tracks_the_oracle_on_pacs_art(tmp_path):
    common = dict(
        train=f"{PACS}:pacs/art_painting",
        test={},
        val_fraction=0.1,
        steps=20,
        batch_size=16,
        lr=1e-3,
        workers=0,
        progress=False,
        min_epoch_steps=20,
        fsr_subsets="0.5,0.75",
        fsr_seeds=1,
    )
    ref = fit(FitConfig.from_dict({**common, "out": str(tmp_path / "ref")}), echo=None)
    run = fit(FitConfig.from_dict({**common, "fraction": 0.1, "out": str(tmp_path / "run")}), echo=None)
    oracle = fsr_of_run(run.path, ref.path)
    assert not oracle.warnings  # same schedule on both sides
    est = estimate_fsr_of_run(run.path, echo=None)
    assert len(est["points"]) == 3 and (run / "fsr-estimate").is_dir()
    assert math.isfinite(est["fsr_est"]) and est["fsr_est"] > 0 and 0.25 <= est["lambda"] <= 4
    assert 0.5 < est["fsr_est"] / oracle.fsr_gamma < 2.0, (est["fsr_est"], oracle.fsr_gamma)
    assert rd.RunDir(run.path).read_json(rd.FSR_ESTIMATE)["fsr_est"] == est["fsr_est"]
