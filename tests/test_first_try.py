"""The path a new user walks after the demo: `lnshift fit` on their own data, as the README shows it."""

import json

from lnshift import rundir as rd
from lnshift.cli import main
from tiny import TINY, image_folder

FAST = [*TINY, "--steps", "2", "--batch-size", "4"]


def test_own_image_folder_without_test_sets(tmp_path):
    """No --test: the built-in PACS test sets belong to the built-in training data only."""
    out = tmp_path / "r"
    assert main(["fit", "--train", str(image_folder(tmp_path / "train", 6)), "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / rd.METRICS).read_text())
    assert metrics["test"] == {} and metrics["val"]["n"] > 0


def test_readme_image_folder_example(tmp_path):
    """`--train DIR --test id=DIR --test ood=DIR --method ln --fraction F --lambda auto`."""
    image_folder(tmp_path / "train", 10)
    image_folder(tmp_path / "test", 3, seed=1)
    image_folder(tmp_path / "other_site", 3, seed=2)
    out = tmp_path / "runs" / "ln"
    argv = ["fit", "--train", str(tmp_path / "train"), "--test", f"id={tmp_path / 'test'}"]
    argv += ["--test", f"ood={tmp_path / 'other_site'}", "--method", "ln", "--fraction", "0.5"]
    assert main([*argv, "--lambda", "auto", "--lambda-grid", "0,1,2", "--out", str(out), *FAST]) == 0
    assert set(json.loads((out / rd.METRICS).read_text())["test"]) == {"id", "ood"}
    assert json.loads((out / rd.LAMBDA).read_text())["lambda"] in (0, 1, 2)


def test_readme_csv_example(tmp_path):
    """`--train FILE.csv --data-root DIR --test-fraction 0.2`: paths relative to the root, groups held out whole."""
    root = image_folder(tmp_path / "images", 10)
    lines = ["path,label,group"]
    lines += [f"{c}/{c}{i}.png,{c},{c}-patient{i // 2}" for c in ("cat", "dog") for i in range(10)]
    csv = tmp_path / "tables" / "groups.csv"
    csv.parent.mkdir()
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lung"
    argv = ["fit", "--train", str(csv), "--data-root", str(root), "--test-fraction", "0.2", "--out", str(out)]
    assert main([*argv, *FAST]) == 0
    metrics = json.loads((out / rd.METRICS).read_text())
    assert set(metrics["test"]) == {"holdout"}
    held = json.loads((out / rd.SPLITS).read_text())["splits"]["test:holdout"]["indices"]
    assert metrics["test"]["holdout"]["n"] == len(held) > 0
    assert all(i ^ 1 in held for i in held)  # rows 2k and 2k+1 are one patient: held out together


def test_failed_fit_does_not_block_the_corrected_command(tmp_path, capsys):
    """A typo'd path fails before training; the corrected command then succeeds in the same --out."""
    image_folder(tmp_path / "train", 6)
    out = ["--out", str(tmp_path / "r"), *FAST]
    assert main(["fit", "--train", str(tmp_path / "trian"), *out]) == 2
    assert "trian" in capsys.readouterr().err
    assert main(["fit", "--train", str(tmp_path / "train"), *out]) == 0
    assert (tmp_path / "r" / rd.DONE).is_file()
    assert main(["fit", "--train", str(tmp_path / "train"), *out]) == 2  # a finished run is not replaced silently
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err and "--resume" not in err
