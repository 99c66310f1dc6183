"""The sections of a run's options: model, data, method (with the strategies' options), optimisation, runtime.

Each field is one `lnshift fit` option: `option()` gives it the help text, and where they are not the
field's own, its option name (`data_root` for `DataConfig.root`) and flag (`--lambda` for `lam`). The
types say what a value may be: a `Literal` is a closed choice, which the command line offers and every
section checks on construction, naming the option (`--precision must be auto, bf16 or fp32, got 'x'`).
Rules that read one section only are that section's `check`; FitConfig checks those across sections.

The sections are frozen: a run's options change only through `FitConfig.replace`, which checks them again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError
from ..training.phases import BUDGETS, Method

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
# validation metrics a search can select on: True where larger is better
SELECT_METRICS = {
    "accuracy": True,
    "balanced_accuracy": True,
    "macro_f1": True,
    "auroc": True,
    "loss": False,
    "ece": False,
}

# closed choices (Method is phases.py's); heads.HEADS and SELECT_METRICS hold the same names (tests/test_config.py)
Head = Literal["linear", "mlp", "attention"]
Augment = Literal["default", "none", "strong"]
ValSize = Literal["holdout", "match"]
InputPipeline = Literal["auto", "device", "workers"]
LambdaTarget = Literal["gamma", "beta", "both"]
Select = Literal["best", "last"]
SelectMetric = Literal["accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss", "ece"]
Precision = Literal["auto", "bf16", "fp32"]
FrozenDtype = Literal["fp32", "bf16"]


def option(
    default: Any,
    help: str,
    *,
    name: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    earlier: Any = MISSING,
) -> Any:
    """A field that is one option of `lnshift fit`.

    `name`: its option name (YAML key, `--search` key, `fit_run` keyword) where it is not the field's;
    `flag`: its command-line flag where it is not `--name-with-dashes`; `earlier`: what runs saved before
    the option existed did, so that their config.yaml compares as they behaved (the default otherwise).
    """
    metadata = {"help": help, "option": name, "flag": flag, "metavar": metavar, "earlier": earlier}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_name(f: dataclasses.Field) -> str:
    return f.metadata.get("option") or f.name


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + option_name(f).replace("_", "-")


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a section (the annotations are strings here)."""
    return get_type_hints(cls)


def optional_of(kind: Any) -> Any:
    """X for `X | None`; any other type as it is."""
    if get_origin(kind) in (Union, UnionType):
        inner = [a for a in get_args(kind) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return kind


def choices(kind: Any) -> tuple[str, ...] | None:
    """The values of a Literal type (also `Literal[...] | None`); None for any other type."""
    kind = optional_of(kind)
    return get_args(kind) if get_origin(kind) is Literal else None


def _either(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen section while it is being built."""
    object.__setattr__(obj, name, value)


def _at_least(obj: Any, names: tuple[str, ...], low: int = 1) -> None:
    for f in fields(obj):
        if f.name in names and getattr(obj, f.name) < low:
            raise ConfigError(f"{flag_of(f)} must be >= {low}, got {getattr(obj, f.name)}")


def documented(cls: type) -> type:
    """Append an Args section to a section's docstring, from its fields' help texts (what help() shows)."""

    def line(f: dataclasses.Field) -> str:
        if not f.metadata:  # a group of options of its own
            return f"{f.name}: see {field_types(cls)[f.name].__name__}"
        return f"{f.name}: {f.metadata['help']} ({flag_of(f)})"

    cls.__doc__ = f"{cls.__doc__}\n\n    Args:\n" + "".join(f"        {line(f)}\n" for f in fields(cls))
    return cls


class Section:
    """What every section does on construction: check its closed choices, then its own rules."""

    def __post_init__(self) -> None:
        types = field_types(type(self))
        for f in fields(self):
            allowed = choices(types[f.name])
            value = getattr(self, f.name)
            if allowed is not None and value is not None and value not in allowed:
                raise ConfigError(f"{flag_of(f)} must be {_either(allowed)}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between this section's fields (none by default)."""


@documented
@dataclass(frozen=True)
class ModelConfig(Section):
    """The backbone: which foundation model, with which weights."""

    name: str = option(
        DEFAULT_MODEL, "timm name, hf-hub: name, hf:FOLDER, open_clip:ARCH or a registered short name", name="model"
    )
    weights: str | None = option(None, "local weights file or folder for --model (no download)")
    pretrained: bool = option(True, "load the model's pretrained weights when no --weights is given")
    kwargs: dict[str, Any] = option(
        {}, "extra constructor arguments for the model, as YAML, e.g. '{img_size: 64}'", name="model_kwargs"
    )


@documented
@dataclass(frozen=True)
class DataConfig(Section):
    """The images: training, validation and test data, the training subset, augmentation, how they load."""

    train: str = option(BUILTIN_TRAIN, "training data: DIR, FILE.zip[:INNER], or FILE.csv (path,label[,group])")
    val: str | None = option(None, "validation data; when absent a stratified hold-out of --train (--val-fraction)")
    test: dict[str, str] | None = option(
        None,
        "named test sets NAME=SPEC (repeat the option for several; default: none, or with the built-in --train "
        f"its test sets {', '.join(f'{k}={v}' for k, v in BUILTIN_TESTS.items())})",
        metavar="NAME=SPEC",
    )
    root: str | None = option(
        None, "folder or zip that CSV paths are relative to (default: the CSV's folder)", name="data_root"
    )
    fraction: float | None = option(None, "use this stratified fraction of the training data (0 < F <= 1)")
    shots: int | None = option(None, "use exactly K training images per class")
    val_fraction: float = option(0.2, "hold-out fraction of --train used for validation when --val is absent")
    val_size: ValSize = option("holdout", "validation images: " + "; ".join(f"{k} ({v})" for k, v in VAL_SIZES.items()))
    test_fraction: float | None = option(None, "hold out this fraction of --train as the test set 'holdout'")
    augment: Augment = option("default", "training augmentation: default (timm), strong (RandAugment + erasing), none")
    skip_bad_images: bool = option(False, "skip undecodable images (listed in the log) instead of stopping")
    # not a runtime option: the two pipelines crop differently (docs/design.md), so it changes results
    input_pipeline: InputPipeline = option(
        "auto",
        "device (decoded images kept on the GPU, augmented there), workers (DataLoader processes, timm's PIL "
        "transforms) or auto (device on a GPU when the images fit and --augment is not strong)",
        earlier="workers",
    )

    def check(self) -> None:
        if self.test is None:
            _set(self, "test", dict(BUILTIN_TESTS) if self.train == BUILTIN_TRAIN else {})
        if self.fraction is not None and self.shots is not None:
            raise ConfigError("give at most one of --fraction and --shots")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.input_pipeline == "device" and self.augment == "strong":
            raise ConfigError("--augment strong (RandAugment, random erasing) exists only in --input-pipeline workers")


@documented
@dataclass(frozen=True)
class StrategyOptions(Section):
    """The options some tuning strategies read (strategies/); the rest ignore them."""

    include_rms: bool = option(False, "also tune RMSNorm scales (off: LayerNorm only)")
    include_layerscale: bool = option(False, "also tune LayerScale gains (off: LayerNorm only)")
    lora_rank: int = option(8, "LoRA rank for --method lora")
    lora_alpha: float = option(16.0, "LoRA alpha for --method lora")
    lora_dropout: float = option(0.0, "LoRA dropout for --method lora (peft's LoraConfig.lora_dropout)")

    def check(self) -> None:
        _at_least(self, ("lora_rank",))
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


@documented
@dataclass(frozen=True)
class MethodConfig(Section):
    """What trains: the method and its head, the strategies' options, lambda rescaling and the FSR estimate."""

    name: Method = option(
        "ln",
        "lp, ln, full, bitfit, lora, lp-ln, cyclic or cyclic-kx; "
        + "; ".join(f"{m}: {text}" for m, text in BUDGETS.items()),
        name="method",
    )
    cycles: int = option(2, "number of head <-> LayerNorm alternations (K) for --method cyclic and cyclic-kx")
    head: Head = option("linear", "classification head: linear, mlp or attention")
    head_hidden: int = option(0, "hidden width of the mlp / attention head (0: twice the feature width)")
    strategy: StrategyOptions = field(default_factory=StrategyOptions)
    lam: str | None = option(
        None,
        "rescale the LayerNorm shift: a number, 'auto' (grid on validation) or 'fsr' (1 / estimated FSR; "
        "EXPERIMENTAL: the estimate's rank correlation with the oracle FSR was 0.21, docs/fsr.md)",
        flag="--lambda",
        metavar="LAMBDA",
    )
    lambda_target: LambdaTarget = option("gamma", "which LayerNorm parameters lambda rescales: gamma, beta or both")
    lambda_grid: str = option(",".join(str(0.25 * i) for i in range(13)), "lambda values tried by --lambda auto")
    lambda_each_cycle: bool = option(
        False, "cyclic, cyclic-kx: rescale after every LayerNorm phase, not once at the end"
    )
    fsr_subsets: str = option(
        "0.25,0.5,0.75", "nested training fractions tuned to estimate FSR (the full set is added)"
    )
    fsr_seeds: int = option(2, "seeds per subset for the FSR estimate")
    subset: float | None = option(None, "keep this nested fraction of the training split (set by the FSR estimator)")
    subset_seed: int = option(0, "seed of --subset")

    def check(self) -> None:
        if self.lam is not None:
            _set(self, "lam", str(self.lam))  # YAML reads `lambda: 1.5` as a number
            if self.lam not in ("auto", "fsr"):
                try:
                    float(self.lam)
                except ValueError:
                    raise ConfigError(f"--lambda must be a number, 'auto' or 'fsr', got {self.lam!r}") from None
            if self.name in ("lp", "full", "bitfit", "lora"):
                raise ConfigError(f"--lambda rescales LayerNorm shifts, which --method {self.name} does not tune")
        if self.lambda_each_cycle and self.lam == "fsr":
            raise ConfigError("--lambda-each-cycle works with a number or 'auto', not 'fsr'")
        if self.subset is not None and not 0 < self.subset <= 1:
            raise ConfigError(f"--subset must be in (0, 1], got {self.subset}")

    @property
    def final_lambda(self) -> bool:
        """Whether lambda rescales the trained run once at the end: an analysis of the finished training
        (pipeline.py), where `lambda_each_cycle` rescales between phases, as part of training."""
        return self.lam is not None and not self.lambda_each_cycle


@documented
@dataclass(frozen=True)
class OptimConfig(Section):
    """How it trains: budget, batch, optimiser, selection of the kept epoch and of hyperparameters, numerics."""

    epochs: int = option(10, "total epochs, split evenly over the method's phases")
    steps: int | None = option(None, "total optimiser steps instead of --epochs (a fixed budget, e.g. for FSR)")
    batch_size: int = option(64, "batch size")
    min_epoch_steps: int = option(
        20, "an epoch (a validation point) is one pass over the data but at least this many steps"
    )
    # a number once FitConfig resolved it; as given, also a list or 'A,B,C' or 'auto' (a grid: `search`)
    lr: float | str | list[float] | None = option(
        None,
        "peak learning rate (AdamW): a number; a list 'A,B,C' or 'auto' (the method's grid) to choose it on "
        "validation (docs/search.md); default: the method's measured default",
    )
    weight_decay: float = option(0.05, "AdamW weight decay for matrices")
    decay_1d: bool = option(False, "also decay 1-D parameters (LayerNorm, biases); off by default")
    warmup: float = option(0.1, "share of each phase's steps spent in linear warm-up")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    select: Select = option("best", "which epoch a phase keeps: best (validation accuracy) or last")
    search: dict[str, Any] = option(
        {},
        "options chosen on validation, as YAML {OPTION: [values] or auto}, e.g. '{lr: auto, weight_decay: [0, "
        "0.05]}'; one run per combination, the best becomes the run (docs/search.md)",
    )
    select_metric: SelectMetric = option(
        "accuracy", "validation metric that --search / a list of --lr values maximises (loss and ece: minimises)"
    )
    seed: int = option(0, "seed for splits, initialisation and data order")
    precision: Precision = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    frozen_dtype: FrozenDtype = option(
        "fp32",
        "storage of the weights that never train: fp32 or bf16 (with bf16 autocast only; the residual stream "
        "then stays bf16: faster and leaner on a GPU, measured in benchmarks/results/README.md)",
    )

    def check(self) -> None:
        _at_least(self, ("epochs", "batch_size", "min_epoch_steps"))
        if self.frozen_dtype == "bf16" and self.precision == "fp32":
            raise ConfigError("--frozen-dtype bf16 needs bf16 autocast: --precision bf16 or auto (on a GPU)")


@documented
@dataclass(frozen=True)
class RuntimeConfig(Section):
    """Where and how this process runs: exactly what may differ between an interrupted run and its --resume
    without changing the result (beyond float rounding: another device, compiled kernels, fast paths)."""

    out: str = option("runs/latest", "run directory to write")
    resume: bool = option(False, "continue an interrupted run in --out from its last checkpoint")
    overwrite: bool = option(False, "replace an existing run in --out")
    progress: bool = option(True, "show progress bars")
    workers: int = option(2, "data-loading worker processes (input pipeline 'workers')")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    devices: int = option(1, "GPUs of this machine to train on, data-parallel via torchrun (docs/distributed.md)")
    eval_batch_size: int = option(256, "batch size for evaluation")
    tensorboard: bool = option(False, "also log losses, learning rate and validation metrics to RUN_DIR/tensorboard")
    compile: bool = option(False, "torch.compile the model for training (pays off on long GPU runs)")
    fast_paths: str = option(
        "auto",
        "exact speed-ups of the backbone (docs/design.md): auto (all of them to train on CUDA; none on the CPU or to "
        f"evaluate), off, all, or a comma list of {', '.join(FAST_PATHS)}; config.yaml records those applied",
    )

    def check(self) -> None:
        if isinstance(self.fast_paths, bool):  # YAML reads `off` as false
            _set(self, "fast_paths", "all" if self.fast_paths else "off")
        parse_fast_paths(self.fast_paths)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        _at_least(self, ("eval_batch_size", "devices"))


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
