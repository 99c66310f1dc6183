"""The `lnshift` command: thin wrappers that parse options and call the library functions of the same name."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import DEFAULT_MODEL, add_fit_options, config_from_args, parse_named, parse_yaml_dict
from .errors import ConfigError, LNShiftError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, options: Callable[[argparse.ArgumentParser], None]):
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, options, fn)
        return fn

    return wrap


def _fit_options(p: argparse.ArgumentParser) -> None:
    add_fit_options(p)


@command("fit", "train a run (LayerNorm tuning or a baseline) and write its run directory", _fit_options)
def cmd_fit(args: argparse.Namespace) -> int:
    from .pipeline import fit
    from .training import distributed as dist
    from .training.evaluate import resolve_device

    cfg = config_from_args(args)
    if not dist.launched() and cfg.runtime.devices > 1:  # the same command, once per GPU, under torchrun
        dist.check_devices(cfg.runtime.devices, resolve_device(cfg.runtime.device))
        return dist.launch(cfg.runtime.devices, args.argv)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cfg.runtime.devices > 1 and cfg.runtime.devices != per_node:
        raise ConfigError(f"--devices {cfg.runtime.devices}, but torchrun started {per_node} processes per machine")
    run = fit(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run.path}")
    return 0


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory written by `lnshift fit`")
    p.add_argument(
        "--test",
        action="append",
        type=parse_named,
        required=True,
        metavar="NAME=SPEC",
        help="test set to score (repeat for several); recorded in the run's metrics.json",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


@command("eval", "re-evaluate a saved run on named test sets", _eval_options)
def cmd_eval(args: argparse.Namespace) -> int:
    from .analyses.saved_run import evaluate_run

    results = evaluate_run(args.run, dict(args.test), device=args.device)
    for name, m in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
    return 0


def _merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory written by `lnshift fit`")
    p.add_argument("--out", required=True, help="safetensors file to write (a plain state dict of the tuned model)")


@command("merge", "write the tuned model as one plain safetensors state dict", _merge_options)
def cmd_merge(args: argparse.Namespace) -> int:
    from .analyses.saved_run import merge_run

    print(f"wrote {merge_run(args.run, args.out)}")
    return 0


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory written by `lnshift fit` (timm backbone, linear head, LayerNorms tuned)")
    p.add_argument(
        "--peft",
        required=True,
        metavar="DIR",
        help="folder to write: a PEFT LN-tuning adapter that PeftModel.from_pretrained(timm_model, DIR) loads",
    )


@command("export", "write the tuned LayerNorms and head as a PEFT adapter for the plain timm model", _export_options)
def cmd_export(args: argparse.Namespace) -> int:
    from .analyses.export import export_peft

    print(f"wrote {export_peft(args.run, args.peft)}")
    return 0


def _inspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name, as for `lnshift fit --model` (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--weights", help="local weights file or folder")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="load pretrained weights (needs them locally; off: architecture only)",
    )
    p.add_argument(
        "--model-kwargs",
        type=parse_yaml_dict,
        default={},
        metavar="YAML",
        help="extra constructor arguments, e.g. '{img_size: 64}'",
    )
    p.add_argument("--include-rms", action="store_true", help="also list RMSNorm modules")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("inspect", "list every LayerNorm of a model with its parameter count and share", _inspect_options)
def cmd_inspect(args: argparse.Namespace) -> int:
    from .backbones import load_backbone, norm_table

    backbone = load_backbone(args.model, args.weights, pretrained=args.pretrained, model_kwargs=args.model_kwargs)
    rows, summary = norm_table(backbone, include_rms=args.include_rms)
    if args.json:
        print(json.dumps({"norms": rows, **summary, "data_config": backbone.data_config}, indent=2, default=list))
        return 0
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"{'name':<{width}}  {'type':<16} {'shape':<12} {'params':>8}")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['type']:<16} {tuple(r['shape'])!s:<12} {r['params']:>8,}")
    print(
        f"{len(rows)} norms, {summary['norm_params']:,} trainable LayerNorm values of "
        f"{summary['backbone_params']:,} backbone parameters ({100 * summary['share']:.3f}%)"
    )
    print(f"preprocessing: {backbone.data_config}")
    return 0


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the demo's run directories (reused when rerun)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--fast", action="store_true", help="a seconds-long smoke version on a random tiny model (tests)")


@command(
    "demo",
    "LP, LN, cyclic and lambda variants on the bundled model and built-in PACS data (CPU, minutes)",
    _demo_options,
)
def cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    run_demo(args.out, fast=args.fast, seed=args.seed)
    return 0


def _no_options(p: argparse.ArgumentParser) -> None:
    """A command without options."""


@command("models", "list the registered foundation models (short names, sources, licences)", _no_options)
def cmd_models(args: argparse.Namespace) -> int:
    from .backbones.registry import format_models_table, models_table

    print(format_models_table(models_table()))
    return 0


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory written by `lnshift fit`")


@command("shift", "per-layer LayerNorm shift of a run (writes shift.json)", _run_arg)
def cmd_shift(args: argparse.Namespace) -> int:
    from .analyses.saved_run import shift_of_run

    print(shift_of_run(args.run).table())
    return 0


def _rescale_options(p: argparse.ArgumentParser) -> None:
    _run_arg(p)
    p.add_argument(
        "--lambda",
        dest="lam",
        required=True,
        help="a number (0 = pretrained LayerNorms, 1 = as fine-tuned, >1 amplifies), 'auto' "
        "(best on the validation split) or 'fsr' (1 / estimated FSR, after `lnshift fsr --estimate`)",
    )
    p.add_argument("--target", default="gamma", choices=["gamma", "beta", "both"], help="parameters to rescale")
    p.add_argument("--grid", help="comma-separated lambdas scored on validation (default: the run's --lambda-grid)")
    p.add_argument(
        "--score-grid",
        action="store_true",
        help="with a number or 'fsr': also score the grid on validation, to compare (always done for 'auto')",
    )
    p.add_argument("--out", help="new run directory to write (default: rescale the run in place)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


@command("rescale", "rescale a run's LayerNorm shift by lambda and re-evaluate it", _rescale_options)
def cmd_rescale(args: argparse.Namespace) -> int:
    from .analyses.saved_run import rescale_run

    result = rescale_run(
        args.run,
        args.lam,
        target=args.target,
        out=args.out,
        grid=args.grid,
        score_grid=args.score_grid,
        device=args.device,
    )
    print(rescale_table(result))
    print(f"run directory: {result['run']}")
    return 0


def rescale_table(result: dict) -> str:
    """The validation grid when scored, the applied lambda marked by how it was chosen, the best one on
    validation marked apart when they differ; then the rescaled model's scores."""
    how = {"given": "given", "val": "best on validation"}.get(result["selected_on"], "1 / FSR estimate")
    lines = ["lambda  val_acc"] if result.get("curve") else []
    for point in result.get("curve", []):
        marks = [how] if point["lambda"] == result["lambda"] else []
        if point["lambda"] == result["best_on_validation"] and how != "best on validation":
            marks.append("best on validation")
        lines.append(f"{point['lambda']:>6g}  {point['accuracy']:.4f}" + (f"  <- {', '.join(marks)}" if marks else ""))
    tests = "".join(f"; test {k} {v['accuracy']:.4f}" for k, v in result["metrics"]["test"].items())
    lines.append(f"lambda {result['lambda']:g} ({how}): val {result['metrics']['val']['accuracy']:.4f}{tests}")
    return "\n".join(lines)


def _fsr_options(p: argparse.ArgumentParser) -> None:
    _run_arg(p)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--reference", help="oracle FSR against this run on fully representative data (same schedule)")
    way.add_argument(
        "--estimate",
        action="store_true",
        help="estimate FSR from the run's own training data (tunes nested subsets; see docs/fsr.md)",
    )


@command("fsr", "Fine-tuning Shift Ratio of a run: oracle (--reference) or estimated (--estimate)", _fsr_options)
def cmd_fsr(args: argparse.Namespace) -> int:
    from .analyses.saved_run import estimate_fsr_of_run, fsr_of_run

    if args.reference:
        report = fsr_of_run(args.run, args.reference)
        print(report.table())
        return 0
    result = estimate_fsr_of_run(args.run)
    print(
        f"FSR_est (gamma) {result['fsr_est']:.3f} +- {result['fsr_std']:.3f}  -> lambda {result['lambda']:.3f}   "
        f"(beta: {result['fsr_beta_est']:.3f}; fit {result['gamma_fit']['model']}, {len(result['points'])} runs)"
    )
    return 0


@command("report", "write one self-contained report.html (and PNG figures) for a run or sweep directory", _run_arg)
def cmd_report(args: argparse.Namespace) -> int:
    from .report import report_main

    report_main(args.run)
    return 0


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep YAML: datasets x methods x regimes x seeds (see docs/sweep.md)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--shard", metavar="I/N", help="run only the I-th of N disjoint slices (e.g. a Slurm array task)")
    how.add_argument("--collect", action="store_true", help="only rebuild the results tables from finished runs")
    p.add_argument(
        "--devices", type=int, default=1, metavar="N", help="run cells on N GPUs at a time, one each (default: 1)"
    )
    p.add_argument(
        "--per-device",
        type=int,
        default=1,
        metavar="K",
        help="worker processes per GPU (default: 1); small models leave a GPU idle, so K > 1 shares it",
    )
    p.add_argument("--datasets", metavar="A,B", help="run only these datasets' cells (default: all)")
    p.add_argument("--methods", metavar="A,B", help="run only these methods' cells (default: all)")
    p.add_argument(
        "--batched",
        action="store_true",
        help="train the seeds, regimes and learning-rate candidates of each lp/ln/lp-ln/cyclic/cyclic-kx "
        "dataset-method pair in batched passes, one per run length, in this process on its device; the rest then "
        "runs on the workers (needs select: last; see docs/multirun.md)",
    )


@command("sweep", "run a benchmark grid, restartable, with one results table", _sweep_options)
def cmd_sweep(args: argparse.Namespace) -> int:
    from .experiments.workers import WorkerPool, worker_count  # no torch

    pool = None
    if not args.collect and worker_count(args.devices, args.per_device) > 1:
        # the workers import the sweep code (and torch) now, alongside this process
        pool = WorkerPool(args.devices, args.per_device, preload=["lnshift.experiments.sweep"])
    try:
        from .experiments.sweep import run_sweep
        from .experiments.sweep_file import load_sweep, parse_shard
        from .experiments.sweep_results import collect

        sweep = load_sweep(args.file)
        if args.collect:
            if args.devices != 1 or args.per_device != 1 or args.datasets or args.methods or args.batched:
                raise ConfigError(
                    "--collect trains nothing; it takes no --devices, --per-device, --datasets, --methods or --batched"
                )
            collect(sweep)
            return 0
        shard = parse_shard(args.shard) if args.shard else None
        datasets = args.datasets.split(",") if args.datasets else None
        methods = args.methods.split(",") if args.methods else None
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    run_sweep(
        sweep,
        shard=shard,
        devices=args.devices,
        per_device=args.per_device,
        datasets=datasets,
        batched=args.batched,
        pool=pool,
        methods=methods,
    )
    return 0


def _toy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the whole study")
    p.add_argument("--json", help="also write the full result to this JSON file")


@command("toy", "the paper's Gaussian study of shift, FSR and lambda (CPU, under a minute)", _toy_options)
def cmd_toy(args: argparse.Namespace) -> int:
    from .experiments.toy import run_toy, toy_table
    from .rundir import write_json

    result = run_toy(seed=args.seed)
    print(toy_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lnshift",
        description="Tune only the LayerNorms of ViT foundation models; measure and use the LayerNorm shift.",
    )
    parser.add_argument("--version", action="version", version=f"lnshift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, options, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        options(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for `fit --devices N`, which runs the same command under torchrun
    try:
        return args.func(args)
    except LNShiftError as e:
        print(f"lnshift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lnshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
