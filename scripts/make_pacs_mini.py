"""Build the small PACS subset shipped inside the package (src/lnshift/assets/pacs-mini.zip).

Reproducible: a fixed seed picks the images from ../shared/data/pacs.zip, every image is resized to
64x64 (LANCZOS) and saved as JPEG quality 90, and zip entries carry a fixed timestamp. Layout:
pacs-mini/{photo,photo-test,cartoon,sketch}/<class>/<name>.jpg with photo and photo-test disjoint.
"""

from __future__ import annotations

import argparse
import io
import random
import zipfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

PLAN = {
    "photo": ("photo", 40),
    "photo-test": ("photo", 20),
    "cartoon": ("cartoon", 20),
    "sketch": ("sketch", 20),
}
SIZE = 64


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pacs", default=str(repo.parent / "shared" / "data" / "pacs.zip"))
    ap.add_argument("--out", default=str(repo / "src" / "lnshift" / "assets" / "pacs-mini.zip"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with zipfile.ZipFile(args.pacs) as src:
        by_domain_class: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name in sorted(src.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".jpg"):
                by_domain_class[(parts[1], parts[2])].append(name)
        taken: dict[tuple[str, str], int] = defaultdict(int)
        shuffled = {k: rng.sample(v, len(v)) for k, v in sorted(by_domain_class.items())}
        with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_STORED) as dst:
            for split, (domain, per_class) in PLAN.items():
                for (dom, cls), names in shuffled.items():
                    if dom != domain:
                        continue
                    start = taken[(dom, cls)]
                    for name in names[start : start + per_class]:
                        img = Image.open(io.BytesIO(src.read(name))).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
                        buf = io.BytesIO()
                        img.save(buf, format="JPEG", quality=90)
                        info = zipfile.ZipInfo(f"pacs-mini/{split}/{cls}/{Path(name).name}", (2020, 1, 1, 0, 0, 0))
                        dst.writestr(info, buf.getvalue())
                    taken[(dom, cls)] += per_class
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
