"""FitConfig: a run's options as five sections, and the one table from option names to section fields.

Users name options flat, as `lnshift fit` does (`lr`, `val_fraction`, `lambda`): on the command line,
in YAML files, in `--search` and as `fit_run` keywords. Code reads them by section (`cfg.optim.lr`).
`OPTIONS` is the one map between the two, generated from the sections' fields; `from_dict`, `replace`,
`options()` and the command line (cli.py) go through it. A run's config.yaml records the sections
(`to_dict`); `from_dict` reads that, the flat form that runs before the sections wrote, and a mix.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from ..errors import ConfigError
from ..training.phases import DEFAULT_LR, LR_GRID
from .sections import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    field_types,
    flag_of,
    option_name,
)


@dataclass(frozen=True)
class FitConfig:
    """The options of one run, by section, as `lnshift fit` takes them and its config.yaml records them.

    Build one from options by name with `FitConfig.from_dict({"method": "ln", "lr": 0.01})` (or by
    section, `{"optim": {"lr": 0.01}}`), change some with `cfg.replace(lr=0.03)`, read them by section
    (`cfg.optim.lr`). Every option is a flag of `lnshift fit` (`--val-fraction`; `lam` is `--lambda`).
    Building it checks the options together, and resolves the method's default lr, a learning-rate grid
    (`lr: auto` or a list) into `search` and the built-in test sets.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The rules across sections (each section checked its own when it was built)."""
        grid, lr = resolve_search(self.optim.search, self.optim.lr, self.method.name)
        lr = DEFAULT_LR[self.method.name] if lr is None else lr
        if grid != self.optim.search or lr != self.optim.lr:
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, search=grid, lr=lr))

    def to_dict(self) -> dict[str, Any]:
        """The options by section, as config.yaml records them."""
        return dataclasses.asdict(self)

    def options(self) -> dict[str, Any]:
        """The options by name, flat (`{"lr": 0.03, ...}`), as the command line and `--search` name them."""
        return {name: option.get(self) for name, option in OPTIONS.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FitConfig:
        """A config from options by name (`lr`, `lambda`), by section (`optim: {lr: ...}`) or both; the rest default.

        Args:
            data: the options, e.g. a YAML file's mapping or config.yaml's `fit:`.
            source: where they come from, for error messages.
        """
        return _build(cls, _nested(flat_options(data, source)))

    def replace(self, **options: Any) -> FitConfig:
        """This config with the given options (by name, as for `from_dict`) changed, checked again.

        What the config resolved from its other values stays as it is (the method's default lr, the
        built-in test sets): to start from those afresh, build a new config with `from_dict`.
        """
        return _replace(self, _nested(flat_options(options, "FitConfig.replace")))

    def changed_from(self, saved: dict[str, Any]) -> list[str]:
        """The options in which this config differs from a run's saved `fit:` options, runtime ones aside.

        The runtime section is what may change between an interrupted run and its --resume. Searched options
        compare by their grids (`search`): the run holds the value its search chose.
        """
        before, now = saved_options(saved), self.options()
        return sorted(
            name
            for name, option in OPTIONS.items()
            if option.section != "runtime" and name not in self.optim.search and before[name] != now[name]
        )


@dataclass(frozen=True)
class Option:
    """One option of a run: its name (YAML key, `--search` key, `fit_run` keyword) and the field it sets."""

    name: str
    path: tuple[str, ...]  # the fields from FitConfig down to it, e.g. ("optim", "lr")
    field: dataclasses.Field
    type: Any

    @property
    def section(self) -> str:
        return self.path[0]

    @property
    def flag(self) -> str:
        return flag_of(self.field)

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is MISSING else f.default

    @property
    def earlier(self) -> Any:
        """What runs saved before the option existed did (MISSING: its default)."""
        return self.field.metadata.get("earlier", MISSING)

    def get(self, cfg: FitConfig) -> Any:
        return functools.reduce(getattr, self.path, cfg)


def _walk(cls: type, path: tuple[str, ...] = ()) -> Iterator[Option]:
    types = field_types(cls)
    for f in fields(cls):
        if is_dataclass(types[f.name]):
            yield from _walk(types[f.name], (*path, f.name))
        else:
            yield Option(option_name(f), (*path, f.name), f, types[f.name])


# option name -> Option, in the order of the sections; the names are unique across sections
OPTIONS: dict[str, Option] = {option.name: option for option in _walk(FitConfig)}
SECTIONS = tuple(f.name for f in fields(FitConfig))
ALIASES = {"lambda": "lam"}  # `lambda` in files and on the command line; a Python keyword, so `lam` in code
_BY_PATH = {option.path: option for option in OPTIONS.values()}
_GROUPS = {option.path[:i] for option in OPTIONS.values() for i in range(1, len(option.path))}

# the Args section of help(FitConfig), from the same help texts as the options, so they cannot drift apart
FitConfig.__doc__ = f"{FitConfig.__doc__}\n    Args:\n" + "".join(
    f"        {name}: {option.help} ({'.'.join(option.path)})\n" for name, option in OPTIONS.items()
)


def flat_options(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Options by name from a mapping of them: flat (`lr: 0.01`), by section (`optim: {lr: 0.01}`), or both.

    `model` and `method` are both sections and options: a mapping is the section, anything else the option.
    """
    options, unknown = _read(data, source)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {sorted(unknown)}")
    return options


def unknown_options(data: dict[str, Any]) -> list[str]:
    """The keys of a mapping of options that name no option (`optim.lrr` inside a section)."""
    return _read(data, "config")[1]


def _read(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    unknown: list[str] = []

    def put(option: Option, value: Any) -> None:
        if option.name in out:
            raise ConfigError(
                f"{source}: option {option.name!r} is given twice (by name and as {'.'.join(option.path)})"
            )
        out[option.name] = value

    def section(mapping: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in mapping.items():
            inner = (*path, ALIASES.get(key, key))
            if inner in _GROUPS and isinstance(value, dict):
                section(value, inner)
            elif inner in _BY_PATH:
                put(_BY_PATH[inner], value)
            else:
                unknown.append(".".join(map(str, inner)))

    for key, value in data.items():
        name = ALIASES.get(key, key)
        if name in SECTIONS and isinstance(value, dict):
            section(value, (name,))
        elif name in OPTIONS:
            put(OPTIONS[name], value)
        else:
            unknown.append(str(key))
    return out, unknown


def _nested(options: dict[str, Any]) -> dict[str, Any]:
    """Flat options as a tree of field names along their paths: {"optim": {"lr": 0.01}}."""
    tree: dict[str, Any] = {}
    for name, value in options.items():
        *parents, leaf = OPTIONS[name].path
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _build(cls: type, tree: dict[str, Any]) -> Any:
    types = field_types(cls)
    return cls(**{k: _build(types[k], v) if is_dataclass(types[k]) else v for k, v in tree.items()})


def _replace(obj: Any, tree: dict[str, Any]) -> Any:
    changes = {k: _replace(getattr(obj, k), v) if is_dataclass(getattr(obj, k)) else v for k, v in tree.items()}
    return dataclasses.replace(obj, **changes)


def saved_options(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved `fit:` options by name, completed for comparison with a config of this version.

    An option the file lacks (it is older than the option) counts as what that version did: the
    option's `earlier` value where it declares one, else its default.
    """
    earlier = {name: option.earlier for name, option in OPTIONS.items() if option.earlier is not MISSING}
    return {**FitConfig().options(), **earlier, **flat_options(saved, "the run's config.yaml")}


# fit options a search may try several values of, with the type of a value (docs/search.md)
SEARCHABLE = {
    "lr": float,
    "weight_decay": float,
    "warmup": float,
    "label_smoothing": float,
    "steps": int,
    "epochs": int,
    "batch_size": int,
    "lora_rank": int,
    "lora_alpha": float,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_values(text: str, option: str) -> list[Any] | str:
    """'auto', or a comma-separated list of values of a searchable option."""
    if text.strip() == "auto":
        return "auto"
    kind = SEARCHABLE[option]
    try:
        return [kind(float(v)) if kind is int else kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{option.replace('_', '-')}: expected numbers separated by commas, got {text!r}") from None


def resolve_search(search: Any, lr: Any, method: str) -> tuple[dict[str, list], float | None]:
    """A config's grid {option: sorted unique values} and its single --lr (None: the method's default).

    `--lr A,B` and `--lr auto` join the grid; 'auto' is the method's learning-rate grid. Every error
    names the option and the value at fault.
    """
    if not isinstance(search, dict):
        raise ConfigError(f"--search: expected a mapping {{option: [values]}}, got {search!r}")
    search = dict(search)
    if isinstance(lr, str) and "," not in lr and lr.strip() != "auto":
        try:
            lr = float(lr)
        except ValueError:
            raise ConfigError(f"--lr: expected a number, a list 'A,B,C' or 'auto', got {lr!r}") from None
    if isinstance(lr, (str, list)):
        if "lr" in search and search["lr"] != lr:
            raise ConfigError(f"--lr {lr!r} and --search lr {search['lr']!r}: give the grid once")
        search["lr"], lr = lr, None
    if lr is not None and (not _is_number(lr) or not lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {lr!r}")
    grid = {}
    for option, values in search.items():
        if option not in SEARCHABLE:
            raise ConfigError(f"--search: {option!r} cannot be searched; searchable options: {list(SEARCHABLE)}")
        if values == "auto":
            if option != "lr":
                raise ConfigError(f"--search {option}: 'auto' exists for lr only (the method's grid); list values")
            values = list(LR_GRID[method])
        if isinstance(values, str):
            values = parse_values(values, option)
        if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
            raise ConfigError(f"--search {option}: expected a non-empty list of numbers or 'auto', got {values!r}")
        grid[option] = sorted({SEARCHABLE[option](v) for v in values})
    return grid, lr
