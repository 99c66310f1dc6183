"""Data shipped inside the package, named `builtin:NAME/SUBSET`, so the quick start needs no download."""

from __future__ import annotations

from importlib import resources

from ..errors import DataError

PREFIX = "builtin:"
BUILTIN = {"pacs-mini": "pacs-mini.zip"}


def resolve_spec(spec: str) -> str:
    """Turn `builtin:pacs-mini/photo` into `<package>/assets/pacs-mini.zip:pacs-mini/photo`; others unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    name, _, subset = spec[len(PREFIX) :].partition("/")
    if name not in BUILTIN:
        raise DataError(f"unknown built-in dataset {spec!r}; available: {[PREFIX + n for n in BUILTIN]}")
    path = resources.files("lnshift") / "assets" / BUILTIN[name]
    inner = f"{name}/{subset}" if subset else name
    return f"{path}:{inner}"
