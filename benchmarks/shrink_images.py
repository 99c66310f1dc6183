"""Copy an image zip with every image downscaled (same paths, JPEG), so a benchmark's data fits a transfer limit.

The bundled model reads 32 px images and the device input pipeline keeps training images at twice
that, so 64 px copies of PACS / LC25000 (128 px in ../shared/data) hold everything the model sees;
only the resize chain differs (128 -> 64 -> 32 instead of 128 -> 32, both antialiased). Results made
from such copies say so.

    python benchmarks/shrink_images.py ../shared/data/pacs.zip .data/pacs64.zip --side 64
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile

from PIL import Image


def shrink(src: str, dest: str, side: int, quality: int) -> tuple[int, int]:
    """Re-encode every image of `src` with its shorter side `side` (never upscaled) into `dest`."""
    n = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest + ".tmp", "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.is_dir():
                continue
            with Image.open(io.BytesIO(zin.read(info))) as img:
                img = img.convert("RGB")
                scale = side / min(img.size)
                if scale < 1:
                    size = (round(img.width * scale), round(img.height * scale))
                    img = img.resize(size, Image.BICUBIC, reducing_gap=None)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=quality)
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), buf.getvalue())
            n += 1
    os.replace(dest + ".tmp", dest)
    return n, os.path.getsize(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src")
    parser.add_argument("dest")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    n, size = shrink(args.src, args.dest, args.side, args.quality)
    print(f"{args.dest}: {n} images, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
