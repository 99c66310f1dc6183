"""`lnshift fit`'s options, generated from the types of the config's fields; `--config FILE` and precedence.

Each option's argparse argument follows from its field's type: `bool` is `--flag` or `--flag false`, a
`Literal` offers its values as choices, `dict[str, str]` is a repeated NAME=SPEC, any other dict is
YAML, a union with `str` stays text for FitConfig to read (`--lr 0.01,0.1`, `--lambda auto`).

Why argparse and not jsonargparse, which also reads dataclasses, Literal and `--config` YAML: tried
(4.53), it names options only with underscores (`--val_fraction`, no setting for dashes: its issue
#301), a bool needs a value (`--compile true`), a dict option takes one YAML mapping where `--test`
is repeated NAME=SPEC, and `--config` applies where it stands on the command line, so a later file
would override an earlier option. Every flag that README, docs, sweeps and scripts use would change;
these thirty lines keep them, and the types still decide each option's parsing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml

from ..errors import ConfigError
from .fit_config import OPTIONS, SECTIONS, FitConfig, Option, flat_options
from .sections import choices, field_types, optional_of


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML file of options; a run's config.yaml gives its `fit:` options."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return data.get("fit", data) if isinstance(data.get("fit"), dict) else data


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_yaml_dict(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{img_size: 64}}', got {text!r}")
    return value


def parse_named(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC (e.g. sketch=data/sketch), got {text!r}")
    return name, spec


def argument(option: Option) -> dict[str, Any]:
    """argparse keywords for an option, from its type; its default is None, so that only given options override."""
    kind = optional_of(option.type)
    metavar = option.field.metadata.get("metavar")
    if kind is bool:
        return {"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    if choices(kind) is not None:
        return {"choices": choices(kind)}
    if get_origin(kind) is dict and get_args(kind) == (str, str):
        return {"action": "append", "type": parse_named, "metavar": metavar or "NAME=VALUE"}
    if kind is dict or get_origin(kind) is dict:
        return {"type": parse_yaml_dict, "metavar": "YAML"}
    kw = {"metavar": metavar} if metavar else {}
    if get_origin(kind) in (Union, UnionType):  # several kinds of value: FitConfig reads the text
        return {"type": str, **kw}
    return {"type": kind, **kw}


def shown_default(option: Option) -> str:
    """The help text with the default appended, unless the text says it already; `%` escaped for argparse."""
    text = option.help
    if "default:" not in text:
        text += f" (default: {option.default})"
    return text.replace("%", "%%")


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """One option per FitConfig field, grouped by section, and `--config FILE`."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of options: flat, keys as below with underscores (also under `fit:`, as in a run's "
        "config.yaml), or by section (`optim: {lr: 0.01}`); options given here override it",
    )
    groups = {}
    for name in SECTIONS:
        doc = (field_types(FitConfig)[name].__doc__ or "").strip()
        groups[name] = parser.add_argument_group(f"{name} options", doc.split("\n\n")[0].replace("%", "%%"))
    for option in OPTIONS.values():
        groups[option.section].add_argument(
            option.flag, dest=option.name, default=None, help=shown_default(option), **argument(option)
        )


def config_from_args(args: argparse.Namespace) -> FitConfig:
    """defaults < --config FILE < options."""
    data = flat_options(load_yaml(args.config), args.config) if args.config else {}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = dict(value) if isinstance(value, list) else value  # repeated NAME=SPEC
    return FitConfig.from_dict(data, source=args.config or "options")
