"""LayerNorm-tuning throughput of lnshift against the loop a user writes today, in one process.

For each model, side by side on the same GPU (bf16 autocast, AdamW, the same batch size):
- reference: peft `LNTuningConfig` on the timm model (LayerNorm names as one exact regex, the head in
  `modules_to_save`), a torch DataLoader with worker processes decoding JPEGs through timm's train
  transform, pinned memory;
- plain: lnshift's loop step (a requires_grad mask over LayerNorms + head) fed by the device input
  pipeline (decoded uint8 images on the GPU, random-resized crops and flips drawn there), eager;
- compiled: the same with torch.compile;
then forward-only evaluation (bf16, inference mode), eager and compiled. lnshift's variants run with
every fast path on (backbones/fastpath.py, what `lnshift fit` turns on to train on CUDA) unless their
name turns one off (-convpatch, -erfgelu, -alltokens, or -nofast for all). Every figure is measured in
this run: img/s, achieved TFLOP/s (torch's FLOP counter on one real step of the whole model; lnshift's
class-token shortcut executes ~7 % less on ViT-B, so its figure is work-equivalent), the share of the
ceiling (--peak-tflops, 790 = dense bf16 matrix rate measured on this workplace's H200; this
machine's own rate is measured and recorded too), peak memory, and the ratio against the reference.
`plain` and `compiled` train from the same initial values on the same batches, so their LayerNorm
values are compared at the end. On NVIDIA GPUs each row also holds the median SM clock and board
power during its timed steps (nvidia-smi, every 100 ms), beside the board's power limit and top
clock: a GPU at its power limit runs the same kernels at lower clocks. --profile adds, per
compiled variant: device time by kind of kernel, the GPU's idle time between kernels, the host
time to launch one step, and the first host-device synchronisation inside a step, if any.

    python benchmarks/throughput.py --out benchmarks/results/throughput_h200.json     # on a GPU
    python benchmarks/throughput.py --smoke                                           # tiny, CPU, CI
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lnshift.backbones.timm_backbone as tb
import lnshift.data.device as dd
from lnshift.backbones import load_backbone
from lnshift.config import FAST_PATHS, environment
from lnshift.data import ImageDataset, open_source
from lnshift.data.device import DeviceBatches, DeviceImages, to_device
from lnshift.rundir import write_json
from lnshift.strategies import StrategyOptions, get_strategy
from lnshift.training.evaluate import autocast
from lnshift.training.heads import Classifier, build_head
from lnshift.training.loop import param_groups, set_trainable, store_frozen, train_step

NUM_CLASSES = 100
PROFILED_STEPS = 3
SPIN = 200_000_000  # GPU cycles (~0.1 s) that torch.cuda._sleep's spin kernel busies the GPU before a profile
# lnshift's training variants: eager, torch.compile, + cuDNN attention first, + frozen weights in bf16,
# + CUDA graphs (one launch per compiled forward / backward instead of hundreds of kernels),
# + inductor's autotuned GEMM templates (which can fuse bias / GELU / residual epilogues; slow to compile)
# + inductor's coordinate-descent tuning of its own Triton kernels' launch configurations,
# + inductor without its mixed-order (row + column) reductions, + inductor's combo (horizontally fused) kernels;
# fast paths off (backbones/fastpath.py): -convpatch: the patch embedding as cuDNN's strided conv;
# -erfgelu: torch's GELU (erf per element, inductor's kernels) instead of the table GELU;
# -alltokens: without the class-token shortcut (the last block's tail on every token, as timm does);
# -nofast: none of them, timm's own forward (what `lnshift fit --fast-paths off` trains);
# -oneqkv: the shortcut with timm's own attention modules (one qkv product, every query in the last block);
# -roialign: crops through roi_align and tensor operations (the CPU path) instead of the Triton kernel;
# -fusedadam: AdamW as one fused kernel (fused=True) instead of its multi-tensor (foreach) kernels
TRAIN_VARIANTS = (
    "plain",
    "compiled",
    "compiled-cudnn",
    "compiled-bf16",
    "compiled-bf16-graphs",
    "compiled-bf16-autotune",
    "compiled-bf16-coord",
    "compiled-bf16-nomix",
    "compiled-bf16-combo",
    "compiled-bf16-convpatch",
    "compiled-bf16-alltokens",
    "compiled-bf16-oneqkv",
    "compiled-bf16-roialign",
    "compiled-bf16-erfgelu",
    "compiled-bf16-fusedadam",
    "compiled-bf16-nofast",
)
EVAL_VARIANTS = ("eval", "eval-compiled", "eval-compiled-nofast")  # -nofast: what `lnshift eval` runs
VARIANTS = ("reference", *TRAIN_VARIANTS, *EVAL_VARIANTS)
# variant suffix -> the fast paths it turns off
FAST_PATHS_OFF = {
    "convpatch": ("patch_matmul",),
    "erfgelu": ("table_gelu",),
    "alltokens": ("class_token",),
    "nofast": FAST_PATHS,
}
COMPILE_ARGS = {  # variant suffix -> torch.compile keywords
    "autotune": {"mode": "max-autotune-no-cudagraphs"},
    "graphs": {"mode": "reduce-overhead"},
    "coord": {"options": {"coordinate_descent_tuning": True}},
    "nomix": {"options": {"triton.mix_order_reduction": False}},
    "combo": {"options": {"combo_kernels": True}},
}


def write_jpegs(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """n smooth random RGB JPEGs (decode cost close to photos, unlike white noise) in 10 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.BICUBIC)
        path = folder / f"c{i % 10}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def timed(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> dict:
    """Seconds per step after `warmup` untimed steps (compilation, loader start-up, allocator), and
    the GPU's median SM clock, board power and power-cap flag during the timed steps (`sampled`)."""
    for _ in range(warmup):
        step()
    sync(device)
    command = smi_query(device, "clocks.sm,power.draw,clocks_event_reasons.sw_power_cap", "-lms", "100")
    with sampled(command, ("sm_clock_mhz", "power_w", "power_capped")) as gpu:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds = (time.perf_counter() - start) / steps
    return {"seconds_per_step": seconds, **gpu}


def smi_query(device: torch.device, fields: str, *options: str) -> list[str] | None:
    """The nvidia-smi command that prints `fields` of `device` as bare CSV numbers; None off NVIDIA GPUs."""
    smi = shutil.which("nvidia-smi")
    if device.type != "cuda" or torch.version.hip or smi is None:
        return None
    gpu = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    return [smi, "-i", gpu, f"--query-gpu={fields}", "--format=csv,noheader,nounits", *options]


SMI_FLAGS = {"Active": 1.0, "Not Active": 0.0}  # how nvidia-smi prints a clock-event reason


def csv_numbers(text: str) -> list[list[float]]:
    """nvidia-smi's CSV lines as numbers (flags as 1 / 0); lines with a field it cannot read ("[N/A]") are left out."""
    rows = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        with contextlib.suppress(ValueError):
            rows.append([SMI_FLAGS[f] if f in SMI_FLAGS else float(f) for f in fields])
    return rows


@contextlib.contextmanager
def sampled(command: list[str] | None, names: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """The median of each column that `command` (a looping nvidia-smi query) prints while the block runs.

    Why: at its power limit (700 W on an H200) a GPU lowers its clocks, so the same kernels run
    slower; the clock, the power and whether the power cap held them down (a flag: 1 when it did in
    most samples) tell a power-bound step from slow code. The dict is filled when the block ends;
    it stays empty without a command or when nothing was read; cut-off lines are left out.
    """
    medians: dict[str, float] = {}
    if command is None:
        yield medians
        return
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield medians
    finally:
        proc.terminate()
        rows = [row for row in csv_numbers(proc.communicate()[0]) if len(row) == len(names)]
        if rows:
            columns = zip(*rows, strict=True)
            medians.update({name: statistics.median(col) for name, col in zip(names, columns, strict=True)})


def host_seconds(step: Callable[[], object], device: torch.device, tries: int = 3) -> float:
    """Host time to launch one step onto an idle GPU (least of `tries`); near the device time, the host limits."""
    best = math.inf
    for _ in range(tries):
        sync(device)
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    sync(device)
    return best


def matmul_tflops(device: torch.device, side: int = 8192, reps: int = 20) -> float:
    """This machine's dense matrix rate (bf16 on a GPU, float32 on the CPU at a small side), in TFLOP/s.

    Why: GPUs of one kind differ by a few percent (clocks, power); recorded beside each run, it tells
    a slower machine from slower code. The ceiling fractions stay against --peak-tflops, as the issue counts.
    """
    cuda = device.type == "cuda"
    side = side if cuda else 256
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    seconds = timed(lambda: a @ a, 3, reps, device)["seconds_per_step"]
    return 2 * side**3 / seconds / 1e12


def gpu_limits(device: torch.device) -> dict[str, float]:
    """The board's power limit (W) and top SM clock (MHz), the bounds `sampled` figures are read against."""
    names = ("power_limit_w", "max_sm_clock_mhz")
    command = smi_query(device, "power.limit,clocks.max.sm")
    if command is None:
        return {}
    rows = csv_numbers(subprocess.run(command, capture_output=True, text=True, check=False).stdout)
    return dict(zip(names, rows[0], strict=True)) if rows and len(rows[0]) == len(names) else {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()  # free an earlier variant's model before its memory is counted against this one
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


KERNEL_KINDS = (  # (kind, pattern of kernel names), first match wins
    ("attention", r"sdpa|flash|fmha|cudnn::fusion|attention"),
    ("matrix product", r"nvjet|gemm|cutlass|xmma|sm90_"),
    ("triton reduction", r"^triton_(per|red)_"),
    ("triton pointwise", r"^triton_poi_"),
    ("lnshift kernels", r"^_(gelu|gelu_backward|crop)_kernel$"),  # gelu_kernel.py, crop_kernel.py
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name)), "other")


def steady_kernel(name: str, annotation: bool) -> bool:
    """Whether a profiled GPU event counts as the steps' kernel: not the spin kernel before them, and no
    annotation range (Optimizer.step#AdamW.step, ...): its kernels count already, and as busy time
    it would hide the gaps between them."""
    return not annotation and "spin_kernel" not in name


def print_profile(step: Callable[[], object], device: torch.device, steps: int = PROFILED_STEPS) -> None:
    """Where a step's device time goes: milliseconds per step by kind of kernel, then the costliest kernels.

    On a GPU the profile starts with a spin kernel (left out of every figure) so that the host has
    queued the first step's kernels before they run, as in steady training: started on an idle GPU,
    the first step idled several times longer between kernels than later ones. After the idle moment
    a power-capped GPU clocks higher for a while, so the profiled steps can run a few percent faster
    than the timed ones (results/README.md, "Profiles of steady steps"): read shares, not totals.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        if device.type == "cuda":
            torch.cuda._sleep(SPIN)
        for _ in range(steps):
            step()
        sync(device)
    if device.type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
        return
    kernels = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and e.self_device_time_total
        and steady_kernel(e.key, e.is_user_annotation)
    ]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1e3 / steps
    total = sum(by_kind.values())
    print(f"device time per step {total:.2f} ms:", flush=True)
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<18} {ms:8.2f} ms  {ms / total:6.1%}")
    print(f"{'ms/step':>8} {'calls':>6}  kernel")
    for e in kernels[:45]:
        print(f"{e.self_device_time_total / 1e3 / steps:8.3f} {e.count / steps:6.0f}  {e.key[:150]}", flush=True)
    print_idle(prof, steps)


def print_idle(prof: torch.profiler.profile, steps: int) -> None:
    """How long the GPU sat idle between kernels, per step, and the longest gaps with their neighbours."""
    spans = sorted(
        (e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == torch.autograd.DeviceType.CUDA
        and e.duration_ns() > 0
        and steady_kernel(e.name(), e.is_user_annotation())
    )
    gaps, end, before = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append(((start - end) / 1e3, before, name))
        if stop > end:
            end, before = stop, name
    idle = sum(g for g, _, _ in gaps) / 1e3 / steps
    print(f"GPU idle between kernels: {idle:.2f} ms per step in {len(gaps) / steps:.0f} gaps; the longest (us):")
    for gap, after, next_name in sorted(gaps, reverse=True)[:8]:
        print(f"  gap {gap:7.1f} us: {after[:60]} -> {next_name[:60]}", flush=True)


def first_sync(step: Callable[[], object]) -> str:
    """Where a step first makes the host wait for the GPU ('' when it never does): each wait idles the GPU."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as err:
        frames = traceback.extract_tb(err.__traceback__)[-5:]
        return f"{str(err).splitlines()[0]} at " + " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return ""


def cudnn_attention() -> contextlib.AbstractContextManager:
    """Prefer cuDNN's fused attention (Hopper kernels) over FlashAttention-2 in SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


# variant suffix -> (module, attribute, stand-in): the code swap an ablation variant measures, undone after it
ABLATIONS = {
    # timm's own attention modules inside the class-token shortcut (one qkv product, every query)
    "oneqkv": (tb, "attention", lambda attn, x, class_only=False: attn(x)[:, :1] if class_only else attn(x)),
    # training crops through roi_align, as on the CPU, instead of the Triton kernel
    "roialign": (dd, "fused_crops", lambda: False),
    # AdamW's fused single-kernel step
    "fusedadam": (torch.optim, "AdamW", functools.partial(torch.optim.AdamW, fused=True)),
}


def variant_fast_paths(variant: str) -> tuple[str, ...]:
    """The fast paths a variant runs with: all but those its name turns off (FAST_PATHS_OFF)."""
    off = {name for suffix, names in FAST_PATHS_OFF.items() if suffix in variant.split("-") for name in names}
    return tuple(name for name in FAST_PATHS if name not in off)


def variant_context(variant: str) -> contextlib.ExitStack:
    """cuDNN attention first and the ABLATIONS swaps that `variant`'s name asks for."""
    stack = contextlib.ExitStack()
    if "cudnn" in variant:
        stack.enter_context(cudnn_attention())
    for suffix, (module, attribute, stand_in) in ABLATIONS.items():
        if suffix in variant:
            stack.enter_context(mock.patch.object(module, attribute, stand_in))
    return stack


def forever(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


# ---------------------------------------------------------------- the reference loop


def reference(args: argparse.Namespace, name: str, folder: Path, device: torch.device) -> dict:
    from peft import LNTuningConfig, get_peft_model
    from torchvision.datasets import ImageFolder

    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **args.model_kwargs)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    regex = "^(" + "|".join(re.escape(n) for n in norms) + ")$"  # short names would also hit Identity norms
    model = get_peft_model(model, LNTuningConfig(target_modules=regex, modules_to_save=["head"])).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data_config = timm.data.resolve_data_config({}, model=model.base_model.model)
    dataset = ImageFolder(str(folder), transform=timm.data.create_transform(**data_config, is_training=True))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    batches = forever(loader)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, args.precision):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    reset_memory(device)
    row = timed(step, args.warmup, args.steps, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return row | {"peak_gib": peak_gib(device), "trainable": trainable}


# ---------------------------------------------------------------- lnshift


def lnshift_model(
    args: argparse.Namespace, name: str, device: torch.device, fast_paths: tuple[str, ...] = FAST_PATHS
) -> tuple[Classifier, list[str]]:
    """The LN-tuning classifier, with these fast paths on."""
    torch.manual_seed(0)
    backbone = load_backbone(name, None, pretrained=False, model_kwargs=args.model_kwargs, fast_paths=fast_paths)
    model = Classifier(backbone, build_head("linear", backbone.feature_dim, backbone.token_dim, NUM_CLASSES))
    names = get_strategy("ln").select(model, StrategyOptions())
    set_trainable(model, names)
    return model.to(device), names


def every_token(model: Classifier) -> None:
    """timm's own forward from now on: the last block on every token (the FLOP yardstick)."""
    if hasattr(model.backbone, "class_token_only"):
        model.backbone.class_token_only = False


def lnshift_train(
    args: argparse.Namespace,
    name: str,
    images: DeviceImages,
    device: torch.device,
    compiled: bool,
    frozen_bf16: bool = False,
    compile_args: dict | None = None,
    fast_paths: tuple[str, ...] = FAST_PATHS,
) -> tuple[dict, dict[str, torch.Tensor], int]:
    model, names = lnshift_model(args, name, device, fast_paths)
    if frozen_bf16:  # what `lnshift fit --frozen-dtype bf16` does
        store_frozen(model, names, torch.bfloat16)
    optimizer = torch.optim.AdamW(param_groups(model, names, 0.05, False), lr=1e-3)
    compile_args = compile_args or {}
    forward = torch.compile(model, **compile_args) if compiled else model
    loss_fn = nn.CrossEntropyLoss(reduction="sum")  # train_step takes the mean over the global batch
    n = args.warmup + args.steps + PROFILED_STEPS + 4  # + 4: host_seconds, first_sync
    batches = iter(
        DeviceBatches(
            images,
            args.batch_size,
            train=True,
            num_samples=n * args.batch_size,
            generator=torch.Generator().manual_seed(0),
        )
    )

    def step() -> None:
        if compile_args.get("mode") == "reduce-overhead":  # a new step: the graphs' output buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        x, y = next(batches)
        train_step(forward, x, y, optimizer, loss_fn, device, args.precision)

    reset_memory(device)
    compile_start = time.perf_counter()
    step()  # the first step compiles; timed separately
    sync(device)
    first = time.perf_counter() - compile_start
    row = timed(step, args.warmup - 1, args.steps, device) | {"peak_gib": peak_gib(device), "first_step_s": first}
    if compiled and args.profile:
        print_profile(step, device)
    params = dict(model.named_parameters())
    tuned = {k: params[k].detach().float().cpu() for k in names}
    if compiled and args.profile and device.type == "cuda":  # last: a step stopped by an error is left half done
        row["host_seconds_per_step"] = host_seconds(step, device)
        print(f"host time to launch a step: {row['host_seconds_per_step'] * 1e3:.2f} ms", flush=True)
        row["first_host_sync"] = first_sync(step)
        print(f"first host sync in a step: {row['first_host_sync'] or 'none'}", flush=True)
    return row, tuned, len(names)


def train_flops(args: argparse.Namespace, name: str, device: torch.device) -> tuple[int, int]:
    """FLOPs of one LN-tuning step (forward + backward) at the benchmark's batch, counted by torch:
    (the whole model's, what lnshift executes). The first is the yardstick of every TFLOP/s and
    ceiling figure, as the issue counts them; the class-token shortcut skips ~7 % of a ViT-B step."""
    model, _ = lnshift_model(args, name, device)
    x = torch.randn(args.batch_size, *args.input_size, device=device)
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device)

    def count() -> int:
        with FlopCounterMode(display=False) as counter:
            with autocast(device, args.precision):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
        return counter.get_total_flops()

    executed = count()
    every_token(model)
    return count(), executed


def eval_throughput(args: argparse.Namespace, name: str, device: torch.device, variant: str) -> dict:
    model, _ = lnshift_model(args, name, device, variant_fast_paths(variant))
    model.eval()
    forward = torch.compile(model) if "compiled" in variant else model
    x = torch.randn(args.batch_size, *args.input_size, device=device)

    @torch.inference_mode()
    def step() -> None:
        with autocast(device, args.precision):
            forward(x)

    reset_memory(device)
    row = timed(step, args.warmup, args.steps, device) | {"peak_gib": peak_gib(device)}
    every_token(model)  # the yardstick, as for training
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), autocast(device, args.precision):
        model(x)
    return row | {"flops": counter.get_total_flops()}


# ---------------------------------------------------------------- driver


def bench_model(args: argparse.Namespace, name: str, folder: Path, device: torch.device) -> dict:
    probe = load_backbone(name, None, pretrained=False, model_kwargs=args.model_kwargs)
    data_config = probe.data_config
    args.input_size = tuple(data_config["input_size"])
    del probe
    source = open_source(str(folder))
    ds = ImageDataset(source, range(len(source)), {c: i for i, c in enumerate(source.classes)}, None)
    start = time.perf_counter()
    images = to_device(ds, data_config, device, crops=True, threads=min(32, os.cpu_count() or 1))
    decode_s = time.perf_counter() - start
    flops, executed = train_flops(args, name, device)
    rows: dict[str, dict] = {}
    tuned: dict[str, dict] = {}
    if "reference" in args.variants:
        rows["reference"] = reference(args, name, folder, device)
    for variant in TRAIN_VARIANTS:
        if variant in args.variants:
            with variant_context(variant):
                rows[variant], tuned[variant], _ = lnshift_train(
                    args,
                    name,
                    images,
                    device,
                    compiled=variant != "plain",
                    frozen_bf16="bf16" in variant,
                    compile_args=COMPILE_ARGS.get(variant.rsplit("-", 1)[-1]),
                    fast_paths=variant_fast_paths(variant),
                )
    for variant in EVAL_VARIANTS:
        if variant in args.variants:
            rows[variant] = eval_throughput(args, name, device, variant)
    for variant, row in rows.items():
        per_image = row.get("flops", flops) / args.batch_size
        row["img_per_s"] = args.batch_size / row["seconds_per_step"]
        row["tflops"] = row["img_per_s"] * per_image / 1e12
        row["ceiling_fraction"] = row["tflops"] / args.peak_tflops
        if variant != "reference" and "reference" in rows and not variant.startswith("eval"):
            row["vs_reference"] = row["img_per_s"] / rows["reference"]["img_per_s"]
    result = {
        "model": name,
        "batch_size": args.batch_size,
        "input_size": list(args.input_size),
        "train_gflop_per_image": flops / args.batch_size / 1e9,
        "executed_train_gflop_per_image": executed / args.batch_size / 1e9,
        "ceiling_img_per_s": args.peak_tflops * 1e12 / (flops / args.batch_size),
        "device_images": {"n": len(images), "bytes": images.nbytes, "decode_seconds": decode_s},
        "variants": rows,
    }
    if "compiled-bf16" in tuned:  # the same steps on the same batches: differences are bf16 / kernel order only
        base = tuned["compiled-bf16"]
        result["layernorms_vs_compiled_bf16_max_abs_diff"] = {
            v: max((t[k] - base[k]).abs().max().item() for k in base)
            for v, t in tuned.items()
            if v.startswith("compiled-bf16-")
        }
    if "plain" in tuned and "compiled" in tuned:
        a, b = tuned["plain"], tuned["compiled"]
        result["compiled_vs_plain_max_abs_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
        result["trained_tensors"] = len(a)
    return result


def table(results: list[dict]) -> str:
    lines = [
        f"{'model':<24} {'variant':<14} {'img/s':>9} {'TFLOP/s':>8} {'ceiling':>8} {'peak GiB':>9} {'x ref':>6}"
        f" {'SM MHz':>7} {'W':>5}",
    ]
    for r in results:
        for variant, row in r["variants"].items():
            ratio = f"{row['vs_reference']:.2f}" if "vs_reference" in row else ""
            clock = f"{row['sm_clock_mhz']:.0f}" if "sm_clock_mhz" in row else ""
            watts = f"{row['power_w']:.0f}{'*' if row.get('power_capped') else ''}" if "power_w" in row else ""
            lines.append(
                f"{r['model']:<24} {variant:<14} {row['img_per_s']:>9.0f} {row['tflops']:>8.1f} "
                f"{row['ceiling_fraction']:>8.1%} {row['peak_gib']:>9.2f} {ratio:>6} {clock:>7} {watts:>5}"
            )
        extra = f"ceiling {r['ceiling_img_per_s']:.0f} img/s at {r['train_gflop_per_image']:.1f} GFLOP/image"
        if "compiled_vs_plain_max_abs_diff" in r:
            extra += (
                f"; compiled vs plain LayerNorms after training: max |diff| {r['compiled_vs_plain_max_abs_diff']:.2e}"
            )
        lines.append(f"{'':<24} {extra}")
    if any(row.get("power_capped") for r in results for row in r["variants"].values()):
        lines.append(f"{'':<24} W*: the board's power cap held its clocks down in most samples")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"img_size\": 32}'")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation, loader start)")
    parser.add_argument("--workers", type=int, default=14, help="DataLoader workers of the reference loop")
    parser.add_argument("--images", type=int, default=2048, help="synthetic JPEGs (256 px) written for both loops")
    parser.add_argument("--variants", default="reference,plain,compiled,eval,eval-compiled")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 ceiling of the GPU")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="print the costliest kernels of the compiled step")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps, no compilation")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.model_kwargs, args.batch_size = "test_vit", {"img_size": 32}, 8
        args.steps, args.warmup, args.workers, args.images = 2, 2, 2, 32
        args.variants, args.device = "reference,plain,eval", "cpu"
    args.variants = set(args.variants.split(","))
    unknown = sorted(args.variants - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    device = torch.device(args.device)
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_cores": os.cpu_count(),
        "matmul_tflops": matmul_tflops(device),
        "gpu_limits": gpu_limits(device),
        "environment": environment(),
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items() if k != "out"},
        "results": [],
    }
    kind = "bf16" if device.type == "cuda" else "float32"
    print(f"this machine's dense {kind} matrix rate: {report['matmul_tflops']:.3g} TFLOP/s", flush=True)
    if report["gpu_limits"]:
        limits = report["gpu_limits"]
        print(f"power limit {limits['power_limit_w']:.0f} W, top SM clock {limits['max_sm_clock_mhz']:.0f} MHz")
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images, 256)
        for name in args.models.split(","):
            report["results"].append(bench_model(args, name, Path(tmp), device))
            print(table(report["results"][-1:]), flush=True)
            if args.out:  # after every model: a run stopped later keeps what it measured
                write_json(args.out, report)
    print("\n" + table(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
