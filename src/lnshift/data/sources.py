"""Image sources: an ImageFolder directory, a folder inside a zip, or a CSV list of labelled files.

Every source becomes the same thing, an ordered list of `Sample`s plus a way to read each file,
so that splitting, hashing and loading never care where the bytes live.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lnshift.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Folders that archivers and editors leave behind; they are never classes.
_IGNORED_FOLDERS = frozenset({"__MACOSX"})
_MAX_SUGGESTIONS = 6


@dataclass(frozen=True)
class Sample:
    """One labelled image; `path` is relative to the source root (as written, for CSV sources)."""

    path: str
    label: str
    group: str | None


class _DirStorage:
    """Files below a directory; `base` is the directory as the user wrote it, for messages."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = Path(base)

    def subfolders(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.is_dir())

    def files(self) -> list[str]:
        found = []
        for dirpath, _, filenames in os.walk(self.root, followlinks=True):
            rel_dir = Path(dirpath).relative_to(self.root)
            found += [(rel_dir / name).as_posix() for name in filenames]
        return found

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image file {self.locate(rel)}: {e}") from e

    def locate(self, rel: str) -> str:
        return str(self.root / rel)


class _ZipStorage:
    """Files below `inner` inside a zip; one open ZipFile per process, so DataLoader workers work.

    A handle inherited through fork shares its file offset with the parent, so a child re-opens
    the archive instead of using it, and pickling (spawn/forkserver workers) drops the handle.
    """

    def __init__(self, base: str, inner: str) -> None:
        self.base = base
        self.path = Path(base)
        self.inner = inner.strip("/")
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        names = self._open().namelist()
        prefix = f"{self.inner}/" if self.inner else ""
        self._names = {n[len(prefix) :] for n in names if n.startswith(prefix) and len(n) > len(prefix)}
        if self.inner and not self._names:
            raise DataError(_missing_folder_message(base, self.inner, names))

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot open zip file {self.base}: {e}") from e
            self._pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": -1}

    def subfolders(self) -> list[str]:
        return sorted({n.split("/")[0] for n in self._names if "/" in n})

    def files(self) -> list[str]:
        return [n for n in self._names if not n.endswith("/")]

    def exists(self, rel: str) -> bool:
        return self._entry(rel) in self._names

    def read(self, rel: str) -> bytes:
        name = posixpath.join(self.inner, self._entry(rel))
        try:
            return self._open().read(name)
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read image file {self.locate(rel)}: {e}") from e

    def locate(self, rel: str) -> str:
        return f"{self.base}:{posixpath.join(self.inner, self._entry(rel))}"

    @staticmethod
    def _entry(rel: str) -> str:
        return posixpath.normpath(rel.replace("\\", "/"))


def _missing_folder_message(base: str, inner: str, names: list[str]) -> str:
    """Name the deepest part of `inner` that exists and list what it holds."""
    parent = inner
    while parent:
        parent = posixpath.dirname(parent)
        prefix = f"{parent}/" if parent else ""
        below = sorted({n[len(prefix) :].split("/")[0] for n in names if n.startswith(prefix)} - {""})
        if below:
            where = f"its folder {parent!r}" if parent else "its top level"
            return f"{base}: the zip has no folder {inner!r}; {where} holds {_short_list(below)}"
    return f"{base}: the zip is empty"


_Storage = _DirStorage | _ZipStorage


class ImageSource:
    """An ordered list of labelled images that can be read as raw bytes or as RGB images."""

    def __init__(self, spec: str, samples: list[Sample], storage: _Storage) -> None:
        self.spec = spec
        self.samples = samples
        self.classes = sorted({s.label for s in samples})
        self._storage = storage
        self.converted: dict[str, int] = {}  # original PIL mode -> images converted to RGB

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ImageSource({self.spec!r}, {len(self)} images, {len(self.classes)} classes)"

    def has_groups(self) -> bool:
        return any(s.group is not None for s in self.samples)

    def read_bytes(self, i: int) -> bytes:
        return self._storage.read(self.samples[i].path)

    def load(self, i: int) -> Image.Image:
        """Decode image `i` fully and return it as RGB; a file PIL cannot decode is a DataError."""
        data = self.read_bytes(i)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode != "RGB":  # reported by the pipeline: "converted N images from mode X"
                    self.converted[img.mode] = self.converted.get(img.mode, 0) + 1
                return _to_rgb(img)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            where = self._storage.locate(self.samples[i].path)
            raise DataError(f"cannot decode image file {where}: {e}") from e

    def find_bad(self, indices: Sequence[int] | None = None) -> list[str]:
        """Paths of the images (all, or those at `indices`) that fail to decode."""
        bad = []
        for i in range(len(self)) if indices is None else indices:
            try:
                self.load(i)
            except DataError:
                bad.append(self.samples[i].path)
        return bad


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB without the two classic surprises of a plain convert("RGB").

    16/32-bit grayscale would be clipped to white, so it is rescaled to 8 bits; transparent
    pixels often hold black or garbage, so images with alpha are composited onto white.
    """
    if img.mode.startswith("I") or img.mode == "F":
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("RGB")


def open_source(spec: str, root: str | None = None) -> ImageSource:
    """Open `DIR`, `FILE.zip`, `FILE.zip:INNER/PATH` or `FILE.csv` (paths relative to `root`)."""
    if spec.lower().endswith(".csv"):
        return _open_csv(spec, root)
    if root is not None:
        raise ConfigError(f"root={root!r} only applies to a .csv source, not to {spec!r}")
    storage = _open_storage(spec)
    return ImageSource(spec, _scan_image_folder(spec, storage), storage)


def _open_storage(spec: str, role: str = "data source") -> _Storage:
    """Storage for a directory or `FILE.zip[:INNER]`; a missing path is a DataError."""
    cut = spec.lower().find(".zip:")
    base, inner = (spec[: cut + 4], spec[cut + 5 :]) if cut >= 0 else (spec, "")
    path = Path(base)
    if not path.exists():
        raise DataError(f"{role} {spec!r}: {base} does not exist")
    if path.is_dir() and cut < 0:
        return _DirStorage(base)
    if path.is_file() and base.lower().endswith(".zip"):
        return _ZipStorage(base, inner)
    raise DataError(f"{role} {spec!r}: expected a folder, a .zip (optionally FILE.zip:INNER/PATH) or a .csv")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_FOLDERS


def _is_image(rel: str) -> bool:
    return posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


def _scan_image_folder(spec: str, storage: _Storage) -> list[Sample]:
    """ImageFolder rule: classes are the immediate subfolders, images anywhere below each."""
    classes = [name for name in storage.subfolders() if not _is_hidden(name)]
    files = storage.files()
    if len(classes) < 2:
        raise DataError(_no_class_folders_message(spec, storage, classes, files))
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for rel in files:
        parts = rel.split("/")
        if len(parts) > 1 and parts[0] in by_class and _is_image(rel) and not any(map(_is_hidden, parts)):
            by_class[parts[0]].append(rel)
    empty = [c for c, paths in by_class.items() if not paths]
    if empty:
        raise DataError(
            f"data source {spec!r}: class folder(s) {_short_list(empty)} hold no images "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return [Sample(rel, c, None) for c in classes for rel in sorted(by_class[c])]


def _no_class_folders_message(spec: str, storage: _Storage, classes: list[str], files: list[str]) -> str:
    """Say what the root holds and, when images sit deeper, which specs would work."""
    top_files = [f for f in files if "/" not in f]
    found = f"only one subfolder, {classes[0]!r}" if classes else f"no subfolders and {len(top_files)} file(s)"
    message = (
        f"data source {spec!r} has no class folders: a source needs at least two subfolders "
        f"(one per class) holding images, but its root holds {found}"
    )
    # A folder whose subfolders hold images directly is a plausible ImageFolder root.
    subfolders_with_images: dict[str, set[str]] = {}
    for rel in files:
        parts = rel.split("/")
        if len(parts) >= 3 and _is_image(rel) and not any(map(_is_hidden, parts)):
            subfolders_with_images.setdefault("/".join(parts[:-2]), set()).add(parts[-2])
    candidates = sorted(
        (folder for folder, subs in subfolders_with_images.items() if len(subs) >= 2),
        key=lambda folder: (folder.count("/"), folder),
    )
    if candidates:
        if isinstance(storage, _ZipStorage):
            specs = [f"{storage.base}:{posixpath.join(storage.inner, c)}" for c in candidates]
        else:
            specs = [str(Path(storage.base) / c) for c in candidates]
        message += f"; did you mean {_short_list(specs, _MAX_SUGGESTIONS)}?"
    return message


def _short_list(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _open_csv(spec: str, root: str | None) -> ImageSource:
    """CSV with header `path,label[,group]`; every listed file must exist under the root."""
    csv_path = Path(spec)
    if not csv_path.is_file():
        raise DataError(f"data source {spec!r}: CSV file does not exist")
    if root is None:
        storage: _Storage = _DirStorage(str(csv_path.parent))
    else:
        storage = _open_storage(root, f"root of {spec}")
    samples: list[Sample] = []
    missing: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise DataError(f"{spec}: the CSV header must name columns 'path' and 'label'; found {columns}")
        reader.fieldnames = columns
        for row in reader:
            line = reader.line_num
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise DataError(f"{spec}: line {line}: empty path or label")
            if path in first_line:
                raise DataError(f"{spec}: line {line}: path {path!r} is also on line {first_line[path]}")
            first_line[path] = line
            if not storage.exists(path):
                missing.append((line, path))
            group = (row.get("group") or "").strip() or None
            samples.append(Sample(path, label, group))
    if missing:
        line, path = missing[0]
        more = f" ({len(missing) - 1} more rows list missing files)" if len(missing) > 1 else ""
        raise DataError(f"{spec}: line {line}: image file {storage.locate(path)} does not exist{more}")
    if not samples:
        raise DataError(f"{spec}: the CSV lists no images")
    return ImageSource(spec, samples, storage)
