"""ImageDataset (caching, DataLoader workers over a zip), class checks and timm transforms."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from lnshift.data import ImageDataset, check_classes, make_transform, open_source
from lnshift.data.dataset import TRAIN_SCALE
from lnshift.errors import ConfigError, DataError

CLASS_TO_IDX = {"cat": 0, "dog": 1}
DATA_CONFIG = {
    "input_size": (3, 48, 48),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def png(shade: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, shade, shade)).save(buf, "PNG")
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    for k, rel in enumerate(["cat/1.png", "cat/2.png", "dog/3.png", "dog/4.png", "dog/5.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png(40 * k))
    return root


def test_items_are_transformed_images_with_class_indices(tmp_path: Path) -> None:
    source = open_source(str(make_folder(tmp_path / "data")))
    plain = ImageDataset(source, [4, 0], CLASS_TO_IDX, transform=None)
    assert len(plain) == 2 and plain.targets == [1, 0]
    image, label = plain[0]
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == (160, 160, 160) and label == 1
    tensors = ImageDataset(source, [4, 0], CLASS_TO_IDX, make_transform(DATA_CONFIG, train=False))
    tensor, label = tensors[1]
    assert tensor.shape == (3, 48, 48) and tensor.dtype == torch.float32 and label == 0


def test_unknown_class_is_rejected(tmp_path: Path) -> None:
    source = open_source(str(make_folder(tmp_path / "data")))
    with pytest.raises(DataError, match=r"unknown class\(es\) \['dog'\]"):
        ImageDataset(source, [0, 3], {"cat": 0}, transform=None)


def test_cache_and_preload_decode_each_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_source(str(make_folder(tmp_path / "data")))
    loads: list[int] = []
    original = source.load
    monkeypatch.setattr(source, "load", lambda i: loads.append(i) or original(i))
    cached = ImageDataset(source, [0, 1, 2], CLASS_TO_IDX, transform=None, cache=True)
    cached[1], cached[1]
    assert loads == [1]
    cached.preload()
    assert sorted(loads) == [0, 1, 2]
    uncached = ImageDataset(source, [3], CLASS_TO_IDX, transform=None)
    uncached[0], uncached[0]
    assert loads.count(3) == 2
    uncached.preload()
    uncached[0]
    assert loads.count(3) == 3


def test_dataloader_workers_read_a_zip_source(tmp_path: Path) -> None:
    """Workers inherit the parent's open ZipFile through fork and must re-open it to read safely."""
    folder = make_folder(tmp_path / "data")
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder).as_posix())
    source = open_source(str(tmp_path / "data.zip"))
    source.load(0)  # the parent now holds an open handle
    to_tensor = make_transform(DATA_CONFIG, train=False)
    dataset = ImageDataset(source, range(len(source)), CLASS_TO_IDX, to_tensor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    images, labels = zip(*loader, strict=True)
    assert torch.cat(labels).tolist() == [0, 0, 1, 1, 1]
    expected = torch.stack([to_tensor(source.load(i)) for i in range(len(source))])
    assert torch.equal(torch.cat(images), expected)


def test_check_classes_names_split_source_and_differences(tmp_path: Path) -> None:
    source = open_source(str(make_folder(tmp_path / "data")))
    check_classes(["cat", "dog"], source, "train")
    with pytest.raises(DataError) as info:
        check_classes(["bird", "cat"], source, "test:photo")
    message = str(info.value)
    assert "test:photo" in message and source.spec in message
    assert "missing ['bird']" in message and "extra ['dog']" in message


def names(transform: object) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_eval_and_none_transforms_resize_then_center_crop() -> None:
    evaluation = make_transform(DATA_CONFIG, train=False)
    assert repr(make_transform(DATA_CONFIG, train=True, augment="none")) == repr(evaluation)
    assert "CenterCrop" in names(evaluation)
    assert evaluation(Image.new("RGB", (32, 32))).shape == (3, 48, 48)
    assert make_transform(DATA_CONFIG, train=False, augment="strong").transforms[0].size == 54


def test_default_train_transform_is_crop_and_flip_with_a_gentler_scale() -> None:
    train = make_transform(DATA_CONFIG, train=True)
    crop = train.transforms[0]
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation"
    assert crop.scale == TRAIN_SCALE and TRAIN_SCALE[0] >= 0.2
    assert names(train)[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert not {"ColorJitter", "RandAugment", "RandomErasing"} & set(names(train))
    assert train(Image.new("RGB", (32, 32))).shape == (3, 48, 48)


def test_strong_train_transform_adds_randaugment_and_erasing() -> None:
    strong = make_transform(DATA_CONFIG, train=True, augment="strong")
    assert {"RandAugment", "RandomErasing"} <= set(names(strong))
    assert "ColorJitter" not in names(strong)
    assert strong(Image.new("RGB", (32, 32))).shape == (3, 48, 48)


def test_unknown_augment_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown augment 'heavy'"):
        make_transform(DATA_CONFIG, train=True, augment="heavy")
