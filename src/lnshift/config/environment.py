"""The library versions and machine recorded beside every result (config.yaml, results tables)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def environment() -> dict[str, str]:
    """Library versions recorded beside every result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in (
        "lnshift",
        "torch",
        "torchvision",
        "timm",
        "peft",
        "safetensors",
        "numpy",
        "transformers",
        "open_clip_torch",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        out["torch_threads"] = str(torch.get_num_threads())
        out["cuda"] = torch.version.cuda or "none"
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out
