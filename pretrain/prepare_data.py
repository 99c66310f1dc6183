"""Pack CIFAR-10's JPEG files into a small, lossless `.npz` that fits the GPU machine's 64 MiB upload.

cifar10.zip is 60 MiB, too much next to the repository. Every one of its 60,000 JPEGs starts with
the same 609-byte header (JFIF, quantisation and Huffman tables, frame header), so the pack stores
that header once and each file's remainder (scan header + entropy-coded data) as bytes: about
19 MB. Nothing is re-encoded: `read_entries` rebuilds every file byte for byte, and
`content_sha256` gives the same digest whether it reads the zip or the pack.

    python pretrain/prepare_data.py                     # ../shared/data/cifar10.zip -> .data/cifar10_pack.npz
    python pretrain/prepare_data.py --zip X --out Y
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = ROOT.parent / "shared" / "data" / "cifar10.zip"  # the data folder beside the repository
DEFAULT_PACK = ROOT / ".data" / "cifar10_pack.npz"
SOS = b"\xff\xda"  # start-of-scan marker: everything before it is the shared header


def file_sha256(path: Path) -> str:
    """sha256 of a file on disk, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha256(names: list[str], files: list[bytes]) -> str:
    """Digest of the dataset itself (entry names and JPEG bytes, in archive order), independent of packaging."""
    digest = hashlib.sha256()
    for name, data in zip(names, files, strict=True):
        digest.update(f"{name}\t{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def read_zip(path: Path) -> tuple[list[str], list[bytes]]:
    """Every .jpg entry of a cifar10 zip, in archive order."""
    with zipfile.ZipFile(path) as archive:
        infos = [info for info in archive.infolist() if info.filename.endswith(".jpg")]
        return [info.filename for info in infos], [archive.read(info) for info in infos]


def read_pack(path: Path) -> tuple[list[str], list[bytes]]:
    """Rebuild the original JPEG files from a pack written by `write_pack`."""
    with np.load(path, allow_pickle=False) as pack:
        header = pack["header"].tobytes()
        blob = pack["blob"].tobytes()
        offsets = pack["offsets"].tolist()
        names = pack["names"].tobytes().decode().split("\n")
        expected = str(pack["content_sha256"])
    files = [header + blob[start:end] for start, end in itertools.pairwise(offsets)]
    if content_sha256(names, files) != expected:
        raise ValueError(f"{path}: rebuilt JPEG bytes do not match the pack's recorded content_sha256")
    return names, files


def read_entries(path: Path) -> tuple[list[str], list[bytes]]:
    """JPEG entry names and bytes from either the original zip or a pack."""
    return read_zip(path) if path.suffix == ".zip" else read_pack(path)


def write_pack(zip_path: Path, out: Path) -> str:
    """Write the pack for `zip_path`; returns the content sha256."""
    names, files = read_zip(zip_path)
    header = files[0][: files[0].index(SOS)]
    if not all(data.startswith(header + SOS) for data in files):
        raise ValueError("not every JPEG shares the first file's header; this pack format cannot hold them")
    tails = [data[len(header) :] for data in files]
    offsets = np.cumsum([0] + [len(tail) for tail in tails], dtype=np.int64)
    digest = content_sha256(names, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        header=np.frombuffer(header, dtype=np.uint8),
        blob=np.frombuffer(b"".join(tails), dtype=np.uint8),
        offsets=offsets,
        names=np.frombuffer("\n".join(names).encode(), dtype=np.uint8),
        content_sha256=np.array(digest),
        source_zip_sha256=np.array(file_sha256(zip_path)),
    )
    read_pack(out)  # round trip: fails loudly if a single byte differs
    return digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--out", type=Path, default=DEFAULT_PACK)
    args = parser.parse_args()
    digest = write_pack(args.zip, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), content sha256 {digest}")


if __name__ == "__main__":
    main()
