"""Random-resized crop, flip and normalisation of cached uint8 images in one GPU kernel.

`device.augment` computes the same thing with torchvision's `roi_align` (bilinear sampling with
area averaging) on a float copy of the selected source images, then flips and normalises in four
more passes: a path whose time (benchmarks/results/README.md) nearly all goes to converting 448 px
sources to float and moving them. This kernel reads the
uint8 pixels it samples and writes the normalised crop once, with roi_align's arithmetic (aligned
boxes, adaptive sampling grid) in the same order, so both give the same values to float rounding
(tests/test_device_data.py runs it through Triton's CPU interpreter against roi_align).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

BLOCK = 512  # output pixels per program


@triton.jit
def _sample(channel, p1, p2, p3, p4, w1, w2, w3, w4, use):
    """One bilinear sample of a uint8 channel, as roi_align sums it; 0 where not `use`."""
    v1 = tl.load(channel + p1, mask=use, other=0).to(tl.float32)
    v2 = tl.load(channel + p2, mask=use, other=0).to(tl.float32)
    v3 = tl.load(channel + p3, mask=use, other=0).to(tl.float32)
    v4 = tl.load(channel + p4, mask=use, other=0).to(tl.float32)
    return tl.where(use, w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, 0.0)


@triton.jit
def _crop_kernel(
    src,  # (N, 3, H, W) uint8
    index,  # (B,) int64: which source image
    rois,  # (B, 7) float32: start_x, start_y, bin_w, bin_h, grid_w, grid_h, count
    flips,  # (B,) bool as int8
    mean,  # (3,) float32
    std,  # (3,) float32
    out,  # (B, 3, OH, OW) float32
    height,
    width,
    OH: tl.constexpr,
    OW: tl.constexpr,
    GH: tl.constexpr,  # largest sampling grid a box can need: ceil(H / OH)
    GW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b * 3 * OH * OW passes 2**31 for large batches of large inputs
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < OH * OW
    ph = offs // OW
    pw = offs % OW
    pw = tl.where(tl.load(flips + b) != 0, OW - 1 - pw, pw)  # a flipped crop's column j samples column OW-1-j
    roi = rois + b * 7 + offs * 0  # the box's constants as blocks (Triton's interpreter can't mix scalar masks)
    start_x, start_y = tl.load(roi), tl.load(roi + 1)
    bin_w, bin_h = tl.load(roi + 2), tl.load(roi + 3)
    grid_w, grid_h, count = tl.load(roi + 4), tl.load(roi + 5), tl.load(roi + 6)
    plane = height * width
    image = src + tl.load(index + b) * 3 * plane
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for iy in tl.static_range(GH):
        y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in tl.static_range(GW):
            x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            # roi_align's bilinear_interpolate: zero outside, clamped at the far edges
            use = inside & (iy < grid_h) & (ix < grid_w)
            use = use & (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
            yc = tl.maximum(y, 0.0)
            xc = tl.maximum(x, 0.0)
            y_low = yc.to(tl.int32)
            x_low = xc.to(tl.int32)
            y_edge = y_low >= height - 1
            x_edge = x_low >= width - 1
            y_low = tl.where(y_edge, height - 1, y_low)
            x_low = tl.where(x_edge, width - 1, x_low)
            y_high = tl.where(y_edge, y_low, y_low + 1)
            x_high = tl.where(x_edge, x_low, x_low + 1)
            ly = tl.where(y_edge, 0.0, yc - y_low)
            lx = tl.where(x_edge, 0.0, xc - x_low)
            hy = 1.0 - ly
            hx = 1.0 - lx
            w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
            p1, p2 = y_low * width + x_low, y_low * width + x_high
            p3, p4 = y_high * width + x_low, y_high * width + x_high
            acc0 += _sample(image, p1, p2, p3, p4, w1, w2, w3, w4, use)
            acc1 += _sample(image + plane, p1, p2, p3, p4, w1, w2, w3, w4, use)
            acc2 += _sample(image + 2 * plane, p1, p2, p3, p4, w1, w2, w3, w4, use)
    dest = out + b * 3 * OH * OW + offs
    tl.store(dest, (acc0 / count / 255.0 - tl.load(mean)) / tl.load(std), mask=inside)
    tl.store(dest + OH * OW, (acc1 / count / 255.0 - tl.load(mean + 1)) / tl.load(std + 1), mask=inside)
    tl.store(dest + 2 * OH * OW, (acc2 / count / 255.0 - tl.load(mean + 2)) / tl.load(std + 2), mask=inside)


def roi_params(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 7) per-box constants of roi_align(aligned=True, sampling_ratio=-1, spatial_scale=1), in its float32 order."""
    boxes = boxes.float()
    start = boxes[:, :2] - 0.5
    extent = (boxes[:, 2:] - 0.5) - start
    # (OW, OH) filled on the device: a tensor made from a list, or `divisor[1] = OH`, is a copy from
    # host memory, which waits for the GPU to finish its queue; and a true division, as roi_align's
    # (CUDA multiplies by a Python number's inverse)
    divisor = extent.new_full((2,), float(size[1]))
    divisor[1:].fill_(float(size[0]))
    bins = extent / divisor
    grid = torch.ceil(bins)  # roi_align: ceil(roi_height / pooled_height), the same quotient
    count = (grid[:, :1] * grid[:, 1:]).clamp(min=1)
    return torch.cat([start, bins, grid, count], dim=1).contiguous()


def resized_crops(
    images: torch.Tensor,
    index: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Crops `boxes` (x1, y1, x2, y2) of images[index] resized to `size`, flipped where `flips`, normalised.

    `images`: uint8 (N, 3, H, W); returns float32 (B, 3, *size), as `device.augment` does.
    """
    n, h, w = len(index), images.shape[-2], images.shape[-1]
    oh, ow = size
    out = torch.empty(n, 3, oh, ow, dtype=torch.float32, device=images.device)
    if n == 0:
        return out
    grid = (n, triton.cdiv(oh * ow, BLOCK))
    on_device = torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext()
    with on_device:  # Triton launches on the current CUDA device (CPU tensors: its interpreter, in tests)
        _crop_kernel[grid](
            images.contiguous(),
            index.to(torch.int64).contiguous(),
            roi_params(boxes, size),
            flips.to(device=images.device, dtype=torch.int8).contiguous(),
            mean.reshape(3).float().contiguous(),
            std.reshape(3).float().contiguous(),
            out,
            h,
            w,
            OH=oh,
            OW=ow,
            GH=math.ceil(h / oh),
            GW=math.ceil(w / ow),
            BLOCK=BLOCK,
        )
    return out
