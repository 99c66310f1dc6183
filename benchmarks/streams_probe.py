# ruff: noqa  (a one-off probe, removed in the next commit; kept in history for the README's numbers)
"""compiled-bf16 vs the same step split into two micro-batches on two CUDA streams (one process)."""

import sys

import torch

sys.path.insert(0, "benchmarks")
import throughput as tp

from lnshift.evaluate import autocast
from lnshift.loop import train_step as plain_step

streams = [torch.cuda.Stream(), torch.cuda.Stream()]


def two_stream_step(forward, x, y, optimizer, loss_fn, device, precision):
    main = torch.cuda.current_stream()
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for s, xs, ys in zip(streams, x.chunk(2), y.chunk(2), strict=False):
        s.wait_stream(main)
        with torch.cuda.stream(s), autocast(device, precision):
            logits = forward(xs)
            losses.append(loss_fn(logits.float(), ys) / len(y))
    torch.autograd.backward(losses)
    for s in streams:
        main.wait_stream(s)
    optimizer.step()


import argparse

name = sys.argv[1]
args = argparse.Namespace(
    model_kwargs={}, batch_size=int(sys.argv[2]), steps=20, warmup=6, precision="auto", profile=False, input_size=None
)
device = torch.device("cuda")
probe = tp.load_backbone(name, None, pretrained=False)
args.input_size = tuple(probe.data_config["input_size"])
dc = probe.data_config
del probe
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as tmp:
    tp.write_jpegs(Path(tmp), 512, 256)
    src = tp.open_source(tmp)
    ds = tp.ImageDataset(src, range(len(src)), {c: i for i, c in enumerate(src.classes)}, None)
    images = tp.to_device(ds, dc, device, crops=True, threads=16)
for label, step in (
    ("compiled-bf16", plain_step),
    ("two-streams", two_stream_step),
    ("compiled-bf16", plain_step),
    ("two-streams", two_stream_step),
):
    tp.train_step = step
    row, tuned, _ = tp.lnshift_train(args, name, images, device, compiled=True, frozen_bf16=True)
    print(
        name,
        label,
        "%.0f img/s" % (args.batch_size / row["seconds_per_step"]),
        "peak {:.2f} GiB".format(row["peak_gib"]),
        flush=True,
    )
    torch._dynamo.reset()
