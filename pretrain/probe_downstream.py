"""Linear probes of lnshift backbones on the downstream data sets, as lnshift sees them (CPU is enough).

For each model: frozen pooled features through lnshift's own loader and eval transform (the model's
`data_config`), then `common.linear_probe` (standardised features, L2 strength chosen on a held-out
fifth of each training fold). Tasks:

- CIFAR-10: 10,000 evenly spaced training images (1,000 a class) -> all 10,000 test images.
- PACS: each domain on its own, 5-fold stratified cross-validation, mean over folds.
- LC25000 (lung): 5-fold cross-validation that keeps every `group` of lc25000_lung_groups.csv whole
  (StratifiedGroupKFold), so augmented copies of one tissue image never straddle a split.

    PYTHONPATH=src python pretrain/probe_downstream.py \\
        --model lnshift/vit-tiny-cifar10 --model sup=.data/tin/vit-tiny-in200-sup.safetensors \\
        --out pretrain/downstream.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from lnshift.backbones import load_backbone
from lnshift.data.dataset import make_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import linear_probe, spaced

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
FOLDS = 5


def read_zip(path: Path, prefix: str) -> tuple[list[str], list[bytes]]:
    """Entry names and JPEG bytes under `prefix`, in archive (sorted) order."""
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if i.filename.startswith(prefix) and i.filename.endswith(".jpg")]
        return [i.filename for i in infos], [archive.read(i) for i in infos]


def tasks(data: Path) -> dict[str, dict[str, Any]]:
    """name -> images (JPEG bytes), labels, and either a fixed test split or the CV groups."""
    out: dict[str, dict[str, Any]] = {}
    names, files = read_zip(data / "cifar10.zip", "cifar10/")
    split = np.array([n.split("/")[1] for n in names])
    label = np.array([n.split("/")[2] for n in names])
    train = np.flatnonzero(split == "train")
    train = train[spaced(len(train), 10_000)]
    test = np.flatnonzero(split == "test")
    keep = np.concatenate([train, test])
    out["cifar10"] = {
        "files": [files[i] for i in keep],
        "labels": label[keep],
        "is_test": np.arange(len(keep)) >= len(train),
    }
    for domain in PACS_DOMAINS:
        names, files = read_zip(data / "pacs.zip", f"pacs/{domain}/")
        out[f"pacs_{domain}"] = {"files": files, "labels": np.array([n.split("/")[2] for n in names])}
    names, files = read_zip(data / "lc25000_lung.zip", "lc25000_lung/")
    with (data / "lc25000_lung_groups.csv").open() as f:
        group_of = {row["path"]: int(row["group"]) for row in csv.DictReader(f)}
    out["lc25000"] = {
        "files": files,
        "labels": np.array([n.split("/")[1] for n in names]),
        "groups": np.array([group_of[n] for n in names]),
    }
    return out


@torch.no_grad()
def embed(model: str, files: list[bytes], batch: int = 250) -> torch.Tensor:
    """Pooled features of lnshift's backbone `model` (a registry name, or name=weights file)."""
    name, _, weights = model.partition("=")
    backbone = load_backbone("lnshift/vit-tiny-cifar10" if weights else name, weights=weights or None)
    transform = make_transform(backbone.data_config, train=False)
    out = []
    for start in range(0, len(files), batch):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in files[start : start + batch]]
        out.append(backbone(torch.stack([transform(im) for im in images])).float())
    return torch.cat(out)


def probe_task(task: dict[str, Any], feats: torch.Tensor, seed: int) -> dict[str, Any]:
    """Accuracy of the linear probe: the fixed split, or the mean over `FOLDS` (group-aware) folds."""
    _, y = np.unique(task["labels"], return_inverse=True)
    y = torch.from_numpy(y)
    if "is_test" in task:
        test = torch.from_numpy(task["is_test"])
        result = linear_probe(feats[~test], y[~test], feats[test], y[test], seed=seed)
        return {"acc": result["acc"], "train": int((~test).sum()), "test": int(test.sum()), "split": "fixed"}
    groups = task.get("groups")
    if groups is not None:
        folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed).split(feats, y, groups)
    else:
        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(feats, y)
    accs = []
    for train, test in folds:
        g = None if groups is None else torch.from_numpy(groups[train])
        accs.append(linear_probe(feats[train], y[train], feats[test], y[test], groups=g, seed=seed)["acc"])
    split = f"{FOLDS}-fold " + ("StratifiedGroupKFold on group" if groups is not None else "StratifiedKFold")
    return {"acc": round(float(np.mean(accs)), 4), "fold_accs": accs, "images": len(y), "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="registry name, or label=weights file")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    all_tasks = tasks(args.data)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "seed": args.seed, "models": {}}
    for model in args.model:
        t0 = time.perf_counter()
        rows: dict[str, Any] = {}
        for name, task in all_tasks.items():
            rows[name] = probe_task(task, embed(model, task["files"]), args.seed)
            print(f"{model} {name}: {rows[name]['acc']:.4f}", flush=True)
        out_of_distribution = [rows[f"pacs_{d}"]["acc"] for d in PACS_DOMAINS] + [rows["lc25000"]["acc"]]
        rows["mean_pacs_lc25000"] = round(float(np.mean(out_of_distribution)), 4)
        rows["wall_s"] = round(time.perf_counter() - t0, 1)
        results["models"][model.partition("=")[0]] = {"weights": model.partition("=")[2] or None, **rows}
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({m: r["mean_pacs_lc25000"] for m, r in results["models"].items()}))


if __name__ == "__main__":
    main()
