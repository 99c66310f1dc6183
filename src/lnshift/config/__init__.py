"""A run's options: one typed dataclass per section, which are at once the YAML file, the `lnshift fit`
options and the run's `config.yaml`, so they cannot drift apart.

sections.py declares the options (type, default, help); fit_config.py composes them into `FitConfig` and
maps option names to fields (`OPTIONS`); cli.py generates the command line from the types.
Precedence: defaults < --config FILE < options.
"""

from .cli import add_fit_options, config_from_args, load_yaml, parse_bool, parse_named, parse_yaml_dict
from .environment import environment
from .fit_config import (
    ALIASES,
    OPTIONS,
    SEARCHABLE,
    SECTIONS,
    FitConfig,
    Option,
    flat_options,
    parse_values,
    resolve_search,
    saved_options,
    unknown_options,
)
from .sections import (
    BUILTIN_DATA,
    BUILTIN_TESTS,
    BUILTIN_TRAIN,
    DEFAULT_MODEL,
    DEVICE_DATA_SHARE,
    DEVICE_DATA_SHARE_ENV,
    FAST_PATHS,
    SELECT_METRICS,
    VAL_SIZES,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    StrategyOptions,
    parse_fast_paths,
)

__all__ = [
    "ALIASES",
    "BUILTIN_DATA",
    "BUILTIN_TESTS",
    "BUILTIN_TRAIN",
    "DEFAULT_MODEL",
    "DEVICE_DATA_SHARE",
    "DEVICE_DATA_SHARE_ENV",
    "FAST_PATHS",
    "OPTIONS",
    "SEARCHABLE",
    "SECTIONS",
    "SELECT_METRICS",
    "VAL_SIZES",
    "DataConfig",
    "FitConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "Option",
    "RuntimeConfig",
    "StrategyOptions",
    "add_fit_options",
    "config_from_args",
    "environment",
    "flat_options",
    "load_yaml",
    "parse_bool",
    "parse_fast_paths",
    "parse_named",
    "parse_values",
    "parse_yaml_dict",
    "resolve_search",
    "saved_options",
    "unknown_options",
]
