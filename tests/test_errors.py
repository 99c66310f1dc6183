"""Bad input gets one clear error naming the culprit, through the real `lnshift fit` command."""

import json
import shutil

import pytest
from PIL import Image

from lnshift import rundir as rd
from lnshift.cli import main
from tiny import TINY, image_folder

FAST = [*TINY, "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25"]


@pytest.fixture
def folder(tmp_path):
    """A 2-class ImageFolder of 8 small real PNGs per class, and a test folder with the same classes."""
    image_folder(tmp_path / "train", 8)
    image_folder(tmp_path / "test", 3, seed=1)
    return tmp_path


def fit(folder, *extra):
    argv = ["fit", "--train", str(folder / "train"), "--test", f"t={folder / 'test'}", "--out", str(folder / "run")]
    return main([*argv, *FAST, *extra])


def error_of(capsys) -> str:
    return capsys.readouterr().err


def test_missing_data_directory(folder, capsys):
    assert main(["fit", "--train", str(folder / "nope"), "--out", str(folder / "run"), *FAST]) == 2
    assert "nope" in error_of(capsys)


def test_corrupt_image_is_listed_and_can_be_skipped(folder, capsys):
    (folder / "train" / "dog" / "dog3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert fit(folder) == 2
    err = error_of(capsys)
    assert "dog3.png" in err and "--skip-bad-images" in err
    assert fit(folder, "--overwrite", "--skip-bad-images") == 0
    splits = json.loads((folder / "run" / rd.SPLITS).read_text())
    assert any("dog3.png" in p for paths in splits["skipped_bad_images"].values() for p in paths)


def test_grayscale_and_rgba_images_are_converted(folder):
    Image.new("L", (20, 20), 128).save(folder / "train" / "cat" / "gray.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(folder / "train" / "dog" / "alpha.png")
    assert fit(folder) == 0
    log = (folder / "run" / rd.LOG).read_text()
    assert "converted to RGB" in log and "from L" in log and "from RGBA" in log


def test_shots_larger_than_a_class(folder, capsys):
    assert fit(folder, "--shots", "50") == 2
    err = error_of(capsys)
    assert "50" in err and ("cat" in err or "dog" in err)


def test_class_names_differ_between_train_and_test(folder, capsys):
    shutil.move(folder / "test" / "dog", folder / "test" / "wolf")
    assert fit(folder) == 2
    err = error_of(capsys)
    assert "test:t" in err and "wolf" in err and "dog" in err


def test_unknown_model_suggests_close_names(folder, capsys):
    assert fit(folder, "--model", "lnshift/vit-tiny-cifar") == 2
    assert "lnshift/vit-tiny-cifar10" in error_of(capsys)


def test_missing_hf_folder_is_named(folder, capsys):
    assert fit(folder, "--model", f"hf:{folder / 'no-model'}") == 2
    err = error_of(capsys)
    assert "HF model folder not found" in err and str(folder / "no-model") in err and "Traceback" not in err


def test_mismatching_weights_name_the_keys(folder, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=8, depth=2)
    save_file(other.state_dict(), tmp_path / "w.safetensors")
    assert fit(folder, "--model", "test_vit", "--weights", str(tmp_path / "w.safetensors")) == 2
    err = error_of(capsys)
    assert "w.safetensors" in err and "blocks." in err


def test_nan_loss_stops_and_names_the_step(folder, capsys, monkeypatch):
    import torch

    class NanLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")

    monkeypatch.setattr("lnshift.training.loop.nn.CrossEntropyLoss", NanLoss)
    assert fit(folder) == 2
    err = error_of(capsys)
    assert "nan" in err and "step 1" in err
    assert not (folder / "run" / rd.DONE).exists()


def test_same_image_in_train_and_test_is_reported(folder):
    shutil.copy(folder / "train" / "cat" / "cat0.png", folder / "test" / "cat" / "copy.png")
    assert fit(folder) == 0
    dup = json.loads((folder / "run" / rd.SPLITS).read_text())["duplicates_with_test"]
    assert [pairs for name, pairs in dup.items() if name.endswith("~test:t")] in ([[["cat/cat0.png", "cat/copy.png"]]],)
    assert "byte-identical" in (folder / "run" / rd.LOG).read_text()
