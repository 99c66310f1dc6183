"""A sweep file (`lnshift sweep FILE`): datasets x methods x regimes x seeds, read, checked and expanded into cells.

Every cell is a run directory OUT/runs/<dataset>/<method>/<regime>/s<seed>. A `+auto` / `+fsr` method
reuses the run of its base method (`ln+auto` rescales `ln`'s run); a base run and its rescaled variants
form one *unit*, and a unit is never split across shards, so concurrent shards never write the same
directory. Errors name the key of the file at fault.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ALIASES, SEARCHABLE, FitConfig, flat_options, load_yaml, unknown_options
from ..errors import ConfigError
from ..training.phases import METHODS

TOP_KEYS = ("out", "base", "datasets", "methods", "regimes", "seeds")
OPTIONAL_KEYS = ("search",)
# options each cell sets itself; a sweep file may not fix them in `base:` or a dataset
SWEPT = ("method", "fraction", "shots", "seed", "out", "resume", "overwrite", "lam", "subset", "subset_seed", "search")
RESCALES = ("auto", "fsr")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SWEEP_COPY = "sweep.yaml"  # the file as given, copied beside the results


@dataclass(frozen=True)
class Regime:
    """How much training data a cell gets: a stratified fraction or K shots per class."""

    fraction: float | None = None
    shots: int | None = None

    @property
    def label(self) -> str:
        return f"f{self.fraction:g}" if self.fraction is not None else f"shots{self.shots}"


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str  # as listed in the sweep, e.g. "ln+auto"
    regime: Regime
    seed: int

    @property
    def base_method(self) -> str:
        return self.method.partition("+")[0]

    @property
    def rescale(self) -> str | None:
        """'auto' or 'fsr' for a rescaled variant of the base method's run."""
        return self.method.partition("+")[2] or None

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.method}/{self.regime.label}/s{self.seed}"

    @property
    def unit(self) -> str:
        """The id of the trained run this cell reads (its own for a plain method)."""
        return f"{self.dataset}/{self.base_method}/{self.regime.label}/s{self.seed}"


@dataclass
class Sweep:
    path: Path
    text: str  # the file exactly as written, copied beside the results
    raw: dict[str, Any]
    out: Path
    base: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    methods: list[str]
    regimes: list[Regime]
    seeds: list[int]
    search: dict[str, Any] = dataclasses.field(default_factory=dict)  # {option: grid} and {method: {option: grid}}

    def search_for(self, method: str) -> dict[str, Any]:
        """The grid a method's cells choose on validation: the file's global one, or the method's own."""
        common = {k: v for k, v in self.search.items() if k in SEARCHABLE}
        return dict(self.search.get(method, common))

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id

    def fit_config(self, cell: Cell) -> FitConfig:
        """The FitConfig of the cell's trained run: defaults < base < dataset < the cell's own options."""
        options = {"test": {}, "progress": False, **self.base, **self.datasets[cell.dataset]}
        options.update(
            method=cell.base_method,
            fraction=cell.regime.fraction,
            shots=cell.regime.shots,
            seed=cell.seed,
            out=str(self.run_dir(cell.unit)),
            search=self.search_for(cell.base_method),
        )
        return FitConfig.from_dict(options, source=str(self.path))


# ---------------------------------------------------------------- loading and validation


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the file and the key at fault.

    Args:
        path: the sweep YAML (datasets x methods x regimes x seeds; docs/sweep.md).
    """
    path = Path(path)
    raw = load_yaml(path)
    text = path.read_text()

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {message}")

    unknown = sorted(set(raw) - set(TOP_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key; a sweep file has {list(TOP_KEYS)} and optionally {list(OPTIONAL_KEYS)}")
    missing = [k for k in TOP_KEYS if k not in raw]
    if missing:
        raise fail(missing[0], "required key is missing")
    if not isinstance(raw["out"], str) or not raw["out"]:
        raise fail("out", f"expected a directory name, got {raw['out']!r}")
    base = _options(raw["base"] or {}, "base", fail)
    try:
        FitConfig.from_dict({"test": {}, **base}, source=str(path))
    except ConfigError as e:
        raise fail("base", str(e)) from None
    if not isinstance(raw["datasets"], dict) or not raw["datasets"]:
        raise fail("datasets", "expected a non-empty mapping of dataset name -> options")
    datasets = {}
    for name, opts in raw["datasets"].items():
        key = f"datasets.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise fail(key, "a dataset name must be letters, digits, '_', '.' or '-' (it names a folder)")
        datasets[name] = _options(opts, key, fail)
        if "train" not in datasets[name]:
            raise fail(f"{key}.train", "required key is missing")
        test = datasets[name].get("test", base.get("test", {}))
        if not isinstance(test, dict) or not all(isinstance(v, str) for v in test.values()):
            raise fail(f"{key}.test", f"expected a mapping of test-set name -> data spec, got {test!r}")
    methods = _unique_list(raw["methods"], "methods", fail)
    regimes = [_regime(r, f"regimes[{i}]", fail) for i, r in enumerate(_unique_list(raw["regimes"], "regimes", fail))]
    if len({r.label for r in regimes}) < len(regimes):
        raise fail("regimes", "two regimes are the same")
    seeds = _unique_list(raw["seeds"], "seeds", fail)
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise fail("seeds", f"expected non-negative integers, got {seed!r}")
    for method in methods:
        base_method, plus, rescale = str(method).partition("+")
        if base_method not in METHODS or (plus and rescale not in RESCALES):
            raise fail(
                "methods", f"unknown method {method!r}; choose from {list(METHODS)}, or LN ones with +auto / +fsr"
            )
    search = _search(raw.get("search") or {}, fail)
    sweep = Sweep(path, text, raw, Path(raw["out"]), base, datasets, methods, regimes, seeds, search)
    for name in datasets:  # FitConfig's own checks, once per dataset and method, before anything runs
        for method in methods:
            cell = Cell(name, method, regimes[0], seeds[0])
            try:
                cfg = sweep.fit_config(cell)
            except ConfigError as e:
                raise fail(f"datasets.{name}", str(e)) from None
            try:
                if cell.rescale:
                    cfg.replace(lam=cell.rescale)
            except ConfigError as e:
                raise fail("methods", f"{method!r}: {e}") from None
    return sweep


def _search(value: Any, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    """`search:` holds grids {option: [values] or auto} for every method, and {method: {option: grid}} for one."""
    if not isinstance(value, dict):
        raise fail("search", f"expected a mapping {{option: [values] or auto}} or {{method: {{...}}}}, got {value!r}")
    for key, grid in value.items():
        if key in METHODS:
            if not isinstance(grid, dict) or not set(grid) <= set(SEARCHABLE):
                raise fail(f"search.{key}", f"expected {{option: [values] or auto}} ({list(SEARCHABLE)}), got {grid!r}")
        elif key not in SEARCHABLE:
            raise fail(f"search.{key}", f"neither a searchable option {list(SEARCHABLE)} nor a method {list(METHODS)}")
    return dict(value)


def _options(opts: Any, key: str, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise fail(key, f"expected a mapping of fit options, got {opts!r}")
    unknown = unknown_options(opts)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", "not a fit option (see `lnshift fit --help`, with underscores)")
    options = flat_options(opts, key)  # flat, or by section as in a run's config.yaml
    for name in options:
        shown = next((k for k in opts if ALIASES.get(k, k) == name), name)  # `lambda` as written
        if name == "search":
            raise fail(f"{key}.search", "grids go in the sweep's top-level `search:` (for every method or per method)")
        if name in SWEPT:
            raise fail(f"{key}.{shown}", "is set per cell by the sweep (methods, regimes, seeds, out)")
        if name == "devices":
            raise fail(f"{key}.devices", "a sweep trains each cell on one GPU; use `lnshift sweep --devices N`")
    return options


def _unique_list(value: Any, key: str, fail: Callable[[str, str], ConfigError]) -> list:
    if not isinstance(value, list) or not value:
        raise fail(key, f"expected a non-empty list, got {value!r}")
    seen = [json.dumps(v, sort_keys=True, default=str) for v in value]
    if len(set(seen)) < len(seen):
        raise fail(key, "lists the same entry twice")
    return value


def _regime(value: Any, key: str, fail: Callable[[str, str], ConfigError]) -> Regime:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("fraction", "shots"):
        raise fail(key, f"expected {{fraction: F}} or {{shots: K}}, got {value!r}")
    [(kind, amount)] = value.items()
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise fail(f"{key}.{kind}", f"expected a number, got {amount!r}")
    if kind == "fraction":
        if not 0 < amount <= 1:
            raise fail(f"{key}.fraction", f"must be in (0, 1], got {amount}")
        return Regime(fraction=float(amount))
    if amount != int(amount) or amount < 1:
        raise fail(f"{key}.shots", f"must be an integer >= 1, got {amount}")
    return Regime(shots=int(amount))


# ---------------------------------------------------------------- cells and shards


def cells(sweep: Sweep) -> list[Cell]:
    """Every cell, in file order: datasets x methods x regimes x seeds."""
    return [Cell(d, m, r, s) for d in sweep.datasets for m in sweep.methods for r in sweep.regimes for s in sweep.seeds]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1 <= I <= N) -> (I, N): the form of `--shard $SLURM_ARRAY_TASK_ID/$N`."""
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index = count = 0
    if not sep or not 1 <= index <= count:
        raise ConfigError(f"--shard expects I/N with 1 <= I <= N (e.g. 2/8), got {text!r}")
    return index, count


def shard_cells(all_cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """The I-th of N disjoint slices: units (a trained run and its rescaled variants) sorted by id, every N-th."""
    index, count = shard
    if not 1 <= index <= count:
        raise ConfigError(f"shard {index}/{count}: expected 1 <= I <= N")
    units = sorted({c.unit for c in all_cells})
    mine = set(units[index - 1 :: count])
    return [c for c in all_cells if c.unit in mine]
