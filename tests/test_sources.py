"""Image sources: ImageFolder directories, folders inside zips, CSV lists, and image decoding."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lnshift.data import ImageSource, Sample, open_source
from lnshift.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is missing (the repo is expected beside shared/data)")
    return path


def image_bytes(color: tuple[int, int, int] = (10, 20, 30), fmt: str = "PNG", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, fmt)
    return buf.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], dir_entries: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in dir_entries:
            zf.writestr(name, b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


TREE = {
    "dog/b.png": image_bytes((0, 0, 255)),
    "dog/a.jpg": image_bytes((0, 255, 0), "JPEG"),
    "cat/deep/nested/c.PNG": image_bytes((255, 0, 0)),
    "cat/x.JPEG": image_bytes((1, 2, 3), "JPEG"),
    "cat/notes.txt": b"not an image",
    "cat/.hidden.png": b"AppleDouble junk",
    "README.md": b"a file in the root is not a class",
}
EXPECTED = [
    Sample("cat/deep/nested/c.PNG", "cat", None),
    Sample("cat/x.JPEG", "cat", None),
    Sample("dog/a.jpg", "dog", None),
    Sample("dog/b.png", "dog", None),
]


def test_directory_follows_imagefolder_rule_in_sorted_order(tmp_path: Path) -> None:
    root = write_files(tmp_path / "data", TREE)
    source = open_source(str(root))
    assert source.samples == EXPECTED
    assert source.classes == ["cat", "dog"]
    assert len(source) == 4
    assert not source.has_groups()
    assert source.read_bytes(3) == TREE["dog/b.png"]
    image = source.load(0)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_zip_without_directory_entries_and_inner_path(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "set.zip", {f"top/part/{rel}": data for rel, data in TREE.items()})
    source = open_source(f"{archive}:top/part")
    assert source.samples == EXPECTED
    assert source.read_bytes(2) == TREE["dog/a.jpg"]
    assert source.load(3).getpixel((4, 4)) == (0, 0, 255)


def test_zip_at_its_root_with_directory_entries(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "set.zip", TREE, dir_entries=("cat/", "dog/", "dog/empty/"))
    assert open_source(str(archive)).samples == EXPECTED


def test_zip_source_survives_pickling_after_use(tmp_path: Path) -> None:
    """Spawned DataLoader workers receive the source pickled; the open ZipFile must not travel."""
    archive = write_zip(tmp_path / "set.zip", TREE)
    source = open_source(str(archive))
    source.load(0)
    clone = pickle.loads(pickle.dumps(source))
    assert clone.read_bytes(3) == TREE["dog/b.png"]


def test_zip_is_reopened_in_a_forked_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handle inherited through fork shares its file offset with the parent's, so it is not reused."""
    source = open_source(str(write_zip(tmp_path / "set.zip", TREE)))
    source.load(0)
    inherited = source._storage._zip
    monkeypatch.setattr(os, "getpid", lambda: -2)
    assert source.read_bytes(3) == TREE["dog/b.png"]
    assert source._storage._zip is not inherited


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        open_source(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nothing.zip:a/b"))
    archive = write_zip(tmp_path / "set.zip", {f"top/{rel}": data for rel, data in TREE.items()})
    with pytest.raises(DataError, match=r"no folder 'top/missing'; its folder 'top' holds 'README\.md', 'cat'"):
        open_source(f"{archive}:top/missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"expected a folder, a \.zip"):
        open_source(str(tmp_path / "notes.txt"))


def test_root_without_class_folders_lists_what_it_found(tmp_path: Path) -> None:
    root = write_files(tmp_path / "flat", {"a.png": image_bytes(), "b.png": image_bytes()})
    with pytest.raises(DataError, match="no subfolders and 2 file"):
        open_source(str(root))


def test_root_one_level_too_high_suggests_inner_paths(tmp_path: Path) -> None:
    files = {f"pacs/{d}/{c}/1.jpg": image_bytes() for d in ("photo", "sketch") for c in ("dog", "cat")}
    archive = write_zip(tmp_path / "pacs.zip", files)
    with pytest.raises(DataError) as info:
        open_source(str(archive))
    message = str(info.value)
    assert "only one subfolder, 'pacs'" in message
    assert f"{archive}:pacs/photo" in message and f"{archive}:pacs/sketch" in message


def test_single_class_folder_is_rejected(tmp_path: Path) -> None:
    root = write_files(tmp_path / "one", {"dog/a.png": image_bytes()})
    with pytest.raises(DataError, match="only one subfolder, 'dog'"):
        open_source(str(root))


def test_class_folder_without_images_is_named(tmp_path: Path) -> None:
    root = write_files(tmp_path / "data", {"dog/a.png": image_bytes(), "cat/readme.txt": b"x"})
    (root / "bird").mkdir()
    with pytest.raises(DataError, match="'bird', 'cat' hold no images"):
        open_source(str(root))


def test_root_option_only_applies_to_csv(tmp_path: Path) -> None:
    root = write_files(tmp_path / "data", TREE)
    with pytest.raises(ConfigError, match="root="):
        open_source(str(root), root=str(tmp_path))


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_relative_to_its_folder_with_groups_and_extra_columns(tmp_path: Path) -> None:
    write_files(tmp_path, TREE)
    table = write_csv(
        tmp_path / "list.csv",
        "path,label,group,comment\ndog/b.png,dog,g1,x\ncat/x.JPEG,cat,,y\ndog/a.jpg,dog,g1,z\n",
    )
    source = open_source(str(table))
    assert source.samples == [
        Sample("dog/b.png", "dog", "g1"),
        Sample("cat/x.JPEG", "cat", None),
        Sample("dog/a.jpg", "dog", "g1"),
    ]
    assert source.classes == ["cat", "dog"]
    assert source.has_groups()
    assert source.read_bytes(0) == TREE["dog/b.png"]


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_csv_with_root(tmp_path: Path, kind: str) -> None:
    if kind == "dir":
        root = str(write_files(tmp_path / "images", TREE))
    else:
        root = str(write_zip(tmp_path / "images.zip", TREE))
    table = write_csv(tmp_path / "list.csv", "label,path\ncat,cat/x.JPEG\ndog,./dog/a.jpg\n")
    source = open_source(str(table), root=root)
    assert [s.path for s in source.samples] == ["cat/x.JPEG", "./dog/a.jpg"]
    assert not source.has_groups()
    assert source.load(1).size == (8, 8)


def test_csv_errors_name_file_columns_line_and_path(tmp_path: Path) -> None:
    write_files(tmp_path, TREE)
    table = write_csv(tmp_path / "bad.csv", "file,class\ndog/b.png,dog\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'path' and 'label'.*\['file', 'class'\]"):
        open_source(str(table))
    table = write_csv(tmp_path / "gone.csv", "path,label\ndog/b.png,dog\ndog/gone.png,dog\ncat/no.png,cat\n")
    with pytest.raises(DataError, match=r"gone\.csv: line 3: image file .*dog/gone\.png does not exist \(1 more"):
        open_source(str(table))
    table = write_csv(tmp_path / "twice.csv", "path,label\ndog/b.png,dog\ndog/b.png,cat\n")
    with pytest.raises(DataError, match=r"line 3: path 'dog/b\.png' is also on line 2"):
        open_source(str(table))
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "absent.csv"))
    with pytest.raises(DataError, match=r"root of .*does not exist"):
        open_source(str(table), root=str(tmp_path / "absent.zip"))


def test_corrupt_image_fails_at_load_and_is_found_by_find_bad(tmp_path: Path) -> None:
    truncated = image_bytes((5, 5, 5), "JPEG", size=64)[:200]
    root = write_files(tmp_path / "data", {**TREE, "dog/broken.jpg": truncated, "cat/junk.png": b"\x89PNG??"})
    source = open_source(str(root))
    paths = [s.path for s in source.samples]
    with pytest.raises(DataError, match=r"cannot decode image file .*dog/broken\.jpg"):
        source.load(paths.index("dog/broken.jpg"))
    assert source.find_bad() == ["cat/junk.png", "dog/broken.jpg"]
    assert source.find_bad([paths.index("dog/a.jpg"), 0]) == []


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_unusual_modes_become_faithful_rgb(tmp_path: Path) -> None:
    gray16 = Image.fromarray(np.array([[0, 32896], [65535, 65535]], dtype=np.uint16))
    rgba = Image.new("RGBA", (2, 2), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    files = {"a/gray16.png": png(gray16), "a/rgba.png": png(rgba), "b/palette.png": png(palette)}
    source = open_source(str(write_files(tmp_path / "modes", files)))
    assert Image.open(tmp_path / "modes" / "a" / "gray16.png").mode.startswith("I")
    loaded = {s.path: source.load(i) for i, s in enumerate(source.samples)}
    assert all(image.mode == "RGB" for image in loaded.values())
    assert np.asarray(loaded["a/gray16.png"])[:, :, 0].tolist() == [[0, 128], [255, 255]]
    assert loaded["a/rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    assert loaded["a/rgba.png"].getpixel((1, 1)) == (200, 100, 50)
    assert loaded["b/palette.png"].getpixel((0, 0)) == (10, 200, 30)


def test_real_pacs_photo_domain() -> None:
    archive = real("pacs.zip")
    source = open_source(f"{archive}:pacs/photo")
    assert isinstance(source, ImageSource)
    assert len(source) == 1670
    assert source.classes == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert Counter(s.label for s in source.samples)["person"] == 432
    assert source.load(0).size == (128, 128)


def test_real_pacs_root_suggests_a_domain() -> None:
    archive = real("pacs.zip")
    with pytest.raises(DataError, match=r"pacs\.zip:pacs/photo"):
        open_source(str(archive))


def test_real_lc25000_csv_inside_zip() -> None:
    source = open_source(str(real("lc25000_lung_groups.csv")), root=str(real("lc25000_lung.zip")))
    assert len(source) == 15000
    assert source.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert source.has_groups()
    assert len({s.group for s in source.samples}) == 701
    assert source.samples[0] == Sample("lc25000_lung/lung_aca/lungaca1.jpg", "lung_aca", "0")
    assert source.load(14999).size == (128, 128)
