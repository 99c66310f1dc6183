"""The fit configuration: one dataclass that is the YAML file, the CLI options and `config.yaml` of a run.

Every field becomes a `lnshift fit` option (`--val-fraction`, ...) with the field's help text, so the
config file and the command line can never drift apart. Precedence: defaults < --config FILE < options.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .phases import BUDGETS

BUILTIN_DATA = "builtin:pacs-mini"
BUILTIN_TRAIN = f"{BUILTIN_DATA}/photo"
# the default --test only while --train is the built-in default: a user's data has other classes
BUILTIN_TESTS = {"photo": f"{BUILTIN_DATA}/photo-test", "sketch": f"{BUILTIN_DATA}/sketch"}
DEFAULT_MODEL = "lnshift/vit-tiny-cifar10"
# the device input pipeline may hold at most this share of the GPU's free memory; beyond it `auto` uses
# workers. Processes that share a GPU (`lnshift sweep --per-device K`) get a K-th of it through the variable.
DEVICE_DATA_SHARE = 0.5
DEVICE_DATA_SHARE_ENV = "LNSHIFT_DEVICE_DATA_SHARE"
# --val-size: how many images validate; protocols use match, so selection sees what a scarce-data user would hold out
VAL_SIZES = {
    "holdout": "all of the validation data: --val, or the --val-fraction hold-out of --train",
    "match": "as many images per class as the --fraction / --shots training subset (at least one), drawn from "
    "that validation data, whole groups; without --fraction / --shots the same as holdout",
}
# --fast-paths: exact speed-ups of the backbone that pay on CUDA GPUs (backbones/fastpath.py applies them)
FAST_PATHS = ("patch_matmul", "table_gelu", "class_token")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FitConfig:
    """The options of one run, as `lnshift fit` takes them and its config.yaml records them.

    Every field is an option `--field-name` of `lnshift fit` (`lam` is `--lambda`); `validate` checks them
    together, and resolves the method's default lr and the built-in test sets.
    """

    # backbone
    model: str = _opt(DEFAULT_MODEL, "timm name, hf-hub: name, hf:FOLDER, open_clip:ARCH or a registered short name")
    weights: str | None = _opt(None, "local weights file or folder for --model (no download)")
    pretrained: bool = _opt(True, "load the model's pretrained weights when no --weights is given")
    model_kwargs: dict = _opt({}, "extra constructor arguments for the model, as YAML, e.g. '{img_size: 64}'")
    # data
    train: str = _opt(BUILTIN_TRAIN, "training data: DIR, FILE.zip[:INNER], or FILE.csv (path,label[,group])")
    val: str | None = _opt(None, "validation data; when absent a stratified hold-out of --train (--val-fraction)")
    test: dict | None = _opt(
        None,
        "named test sets NAME=SPEC (repeat the option for several; default: none, or with the built-in --train "
        f"its test sets {', '.join(f'{k}={v}' for k, v in BUILTIN_TESTS.items())})",
    )
    data_root: str | None = _opt(None, "folder or zip that CSV paths are relative to (default: the CSV's folder)")
    fraction: float | None = _opt(None, "use this stratified fraction of the training data (0 < F <= 1)")
    shots: int | None = _opt(None, "use exactly K training images per class")
    val_fraction: float = _opt(0.2, "hold-out fraction of --train used for validation when --val is absent")
    val_size: str = _opt("holdout", "validation images: " + "; ".join(f"{k} ({v})" for k, v in VAL_SIZES.items()))
    test_fraction: float | None = _opt(None, "hold out this fraction of --train as the test set 'holdout'")
    augment: str = _opt("default", "training augmentation: default (timm), strong (RandAugment + erasing), none")
    skip_bad_images: bool = _opt(False, "skip undecodable images (listed in the log) instead of stopping")
    # method
    method: str = _opt(
        "ln",
        "lp, ln, full, bitfit, lora, lp-ln, cyclic or cyclic-kx; "
        + "; ".join(f"{m}: {text}" for m, text in BUDGETS.items()),
    )
    cycles: int = _opt(2, "number of head <-> LayerNorm alternations (K) for --method cyclic and cyclic-kx")
    head: str = _opt("linear", "classification head: linear, mlp or attention")
    head_hidden: int = _opt(0, "hidden width of the mlp / attention head (0: twice the feature width)")
    include_rms: bool = _opt(False, "also tune RMSNorm scales (off: LayerNorm only)")
    include_layerscale: bool = _opt(False, "also tune LayerScale gains (off: LayerNorm only)")
    lora_rank: int = _opt(8, "LoRA rank for --method lora")
    lora_alpha: float = _opt(16.0, "LoRA alpha for --method lora")
    # lambda rescaling and FSR
    lam: str | None = _opt(
        None,
        "rescale the LayerNorm shift: a number, 'auto' (grid on validation) or 'fsr' (1 / estimated FSR; "
        "EXPERIMENTAL: the estimate's rank correlation with the oracle FSR was 0.21, docs/fsr.md)",
        flag="--lambda",
    )
    lambda_target: str = _opt("gamma", "which LayerNorm parameters lambda rescales: gamma, beta or both")
    lambda_grid: str = _opt(",".join(str(0.25 * i) for i in range(13)), "lambda values tried by --lambda auto")
    lambda_each_cycle: bool = _opt(False, "cyclic, cyclic-kx: rescale after every LayerNorm phase, not once at the end")
    fsr_subsets: str = _opt("0.25,0.5,0.75", "nested training fractions tuned to estimate FSR (the full set is added)")
    fsr_seeds: int = _opt(2, "seeds per subset for the FSR estimate")
    subset: float | None = _opt(None, "keep this nested fraction of the training split (set by the FSR estimator)")
    subset_seed: int = _opt(0, "seed of --subset")
    # optimisation
    epochs: int = _opt(10, "total epochs, split evenly over the method's phases")
    steps: int | None = _opt(None, "total optimiser steps instead of --epochs (a fixed budget, e.g. for FSR)")
    batch_size: int = _opt(64, "batch size")
    min_epoch_steps: int = _opt(
        20, "an epoch (a validation point) is one pass over the data but at least this many steps"
    )
    lr: float | None = _opt(
        None,
        "peak learning rate (AdamW): a number; a list 'A,B,C' or 'auto' (the method's grid) to choose it on "
        "validation (docs/search.md); default: the method's measured default",
    )
    weight_decay: float = _opt(0.05, "AdamW weight decay for matrices")
    decay_1d: bool = _opt(False, "also decay 1-D parameters (LayerNorm, biases); off by default")
    warmup: float = _opt(0.1, "share of each phase's steps spent in linear warm-up")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    select: str = _opt("best", "which epoch a phase keeps: best (validation accuracy) or last")
    search: dict = _opt(
        {},
        "options chosen on validation, as YAML {OPTION: [values] or auto}, e.g. '{lr: auto, weight_decay: [0, "
        "0.05]}'; one run per combination, the best becomes the run (docs/search.md)",
    )
    select_metric: str = _opt(
        "accuracy", "validation metric that --search / a list of --lr values maximises (loss and ece: minimises)"
    )
    seed: int = _opt(0, "seed for splits, initialisation and data order")
    # runtime
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    devices: int = _opt(1, "GPUs of this machine to train on, data-parallel via torchrun (docs/distributed.md)")
    precision: str = _opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    frozen_dtype: str = _opt(
        "fp32",
        "storage of the weights that never train: fp32 or bf16 (with bf16 autocast only; the residual stream "
        "then stays bf16: faster and leaner on a GPU, measured in benchmarks/results/README.md)",
    )
    workers: int = _opt(2, "data-loading worker processes (input pipeline 'workers')")
    input_pipeline: str = _opt(
        "auto",
        "device (decoded images kept on the GPU, augmented there), workers (DataLoader processes, timm's PIL "
        "transforms) or auto (device on a GPU when the images fit and --augment is not strong)",
    )
    compile: bool = _opt(False, "torch.compile the model for training (pays off on long GPU runs)")
    fast_paths: str = _opt(
        "auto",
        "exact speed-ups of the backbone (docs/design.md): auto (all of them to train on CUDA; none on the CPU or to "
        f"evaluate), off, all, or a comma list of {', '.join(FAST_PATHS)}; config.yaml records those applied",
    )
    eval_batch_size: int = _opt(256, "batch size for evaluation")
    out: str = _opt("runs/latest", "run directory to write")
    resume: bool = _opt(False, "continue an interrupted run in --out from its last checkpoint")
    overwrite: bool = _opt(False, "replace an existing run in --out")
    progress: bool = _opt(True, "show progress bars")
    tensorboard: bool = _opt(False, "also log losses, learning rate and validation metrics to RUN_DIR/tensorboard")

    def __post_init__(self) -> None:
        if self.test is None:
            self.test = dict(BUILTIN_TESTS) if self.train == BUILTIN_TRAIN else {}
        self.validate()

    def validate(self) -> None:
        from .phases import DEFAULT_LR, METHODS

        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {list(METHODS)}")
        self.search, lr = resolve_search(self.search, self.lr, self.method)
        self.lr = DEFAULT_LR[self.method] if lr is None else lr
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"--select-metric must be one of {list(SELECT_METRICS)}, got {self.select_metric!r}")
        if self.fraction is not None and self.shots is not None:
            raise ConfigError("give at most one of --fraction and --shots")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_size not in VAL_SIZES:
            raise ConfigError(f"--val-size must be {' or '.join(VAL_SIZES)}, got {self.val_size!r}")
        if self.input_pipeline not in ("auto", "device", "workers"):
            raise ConfigError(f"--input-pipeline must be auto, device or workers, got {self.input_pipeline!r}")
        if self.input_pipeline == "device" and self.augment == "strong":
            raise ConfigError("--augment strong (RandAugment, random erasing) exists only in --input-pipeline workers")
        if isinstance(self.fast_paths, bool):  # YAML reads `off` as false
            self.fast_paths = "all" if self.fast_paths else "off"
        parse_fast_paths(self.fast_paths)
        if self.select not in ("best", "last"):
            raise ConfigError(f"--select must be 'best' or 'last', got {self.select!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.frozen_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--frozen-dtype must be fp32 or bf16, got {self.frozen_dtype!r}")
        if self.frozen_dtype == "bf16" and self.precision == "fp32":
            raise ConfigError("--frozen-dtype bf16 needs bf16 autocast: --precision bf16 or auto (on a GPU)")
        if self.lambda_target not in ("gamma", "beta", "both"):
            raise ConfigError(f"--lambda-target must be gamma, beta or both, got {self.lambda_target!r}")
        if self.lam is not None:
            self.lam = str(self.lam)
            if self.lam not in ("auto", "fsr"):
                try:
                    float(self.lam)
                except ValueError:
                    raise ConfigError(f"--lambda must be a number, 'auto' or 'fsr', got {self.lam!r}") from None
            if self.method in ("lp", "full", "bitfit", "lora"):
                raise ConfigError(f"--lambda rescales LayerNorm shifts, which --method {self.method} does not tune")
        if self.lambda_each_cycle and self.lam == "fsr":
            raise ConfigError("--lambda-each-cycle works with a number or 'auto', not 'fsr'")
        if self.subset is not None and not 0 < self.subset <= 1:
            raise ConfigError(f"--subset must be in (0, 1], got {self.subset}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        for name in ("epochs", "batch_size", "eval_batch_size", "min_epoch_steps", "devices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def final_lambda(self) -> bool:
        """Whether lambda rescales the trained run once at the end: an analysis of the finished training
        (pipeline.py), where `lambda_each_cycle` rescales between phases, as part of training."""
        return self.lam is not None and not self.lambda_each_cycle

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FitConfig:
        data = dict(data)
        if "lambda" in data:  # the option's name in files and on the command line
            data["lam"] = data.pop("lambda")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}")
        return cls(**data)


# the Args section of help(FitConfig), from the same help texts as the options, so they cannot drift apart
FitConfig.__doc__ = f"{FitConfig.__doc__}\n    Args:\n" + "".join(
    f"        {f.name}: {f.metadata['help'].replace('%%', '%')}\n" for f in fields(FitConfig)
)

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
# validation metrics a search can select on: True where larger is better
SELECT_METRICS = {
    "accuracy": True,
    "balanced_accuracy": True,
    "macro_f1": True,
    "auroc": True,
    "loss": False,
    "ece": False,
}


def parse_fast_paths(setting: str) -> tuple[str, ...] | None:
    """The FAST_PATHS a --fast-paths setting names, in their order; None for `auto` (the device decides)."""
    if setting == "auto":
        return None
    if setting == "off":
        return ()
    if setting == "all":
        return FAST_PATHS
    names = {name.strip() for name in setting.split(",")} if isinstance(setting, str) else {repr(setting)}
    unknown = sorted(names - set(FAST_PATHS))
    if unknown:
        raise ConfigError(f"--fast-paths: unknown {unknown}; give auto, off, all or a comma list of {list(FAST_PATHS)}")
    return tuple(name for name in FAST_PATHS if name in names)


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
    from .phases import LR_GRID

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


# Options newer than some saved runs: what those older versions did, for comparing their config.yaml.
# Any other option missing from an old file takes its default (it behaved as the default then).
EARLIER_BEHAVIOUR = {"input_pipeline": "workers"}


def saved_options(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved `fit:` options completed for comparison with a config of this version."""
    return {**FitConfig().to_dict(), **EARLIER_BEHAVIOUR, **saved}


def load_yaml(path: str | Path) -> dict[str, Any]:
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


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_yaml_dict(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{img_size: 64}}', got {text!r}")
    return value


def _parse_named(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC (e.g. sketch=data/sketch), got {text!r}")
    return name, spec


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """One CLI option per FitConfig field; defaults are None so only given options override the config."""
    parser.add_argument("--config", help="YAML file of options (keys as below, with underscores)")
    for f in fields(FitConfig):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        help_text = f.metadata["help"]
        kind = str(f.type)
        if f.name == "test":
            parser.add_argument(flag, action="append", type=_parse_named, metavar="NAME=SPEC", help=help_text)
        elif kind == "dict":
            parser.add_argument(flag, type=_parse_yaml_dict, metavar="YAML", help=help_text)
        elif kind == "bool":
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="BOOL", help=help_text)
        else:
            scalar = str if f.name == "lr" else {"int": int, "float": float}.get(kind.split(" ")[0], str)
            parser.add_argument(flag, dest=f.name, type=scalar, help=f"{help_text} (default: {f.default})")


def config_from_args(args: argparse.Namespace) -> FitConfig:
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for f in fields(FitConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        data[f.name] = dict(value) if f.name == "test" else value
    return FitConfig.from_dict(data, source=args.config or "options")


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
