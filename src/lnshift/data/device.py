"""The device input pipeline: decoded images kept as uint8 tensors on the compute device, augmented there.

Why: LayerNorm tuning of a ViT on one H200 consumes several thousand images per second, more than
JPEG decoding in worker processes delivers, and the data of few-shot and benchmark runs is small.
So every image is decoded and resized once (once per process: the runs of a sweep share them) and
kept as uint8:
- evaluation images exactly as timm's eval transform leaves them before ToTensor / Normalize, so
  the model sees bit-identical inputs to the `workers` pipeline;
- training images as their central square at TRAIN_SIDE_FACTOR x the model's input side, from which
  a random-resized crop (torchvision's sampling rule, bilinear with area averaging via roi_align)
  and a horizontal flip are drawn on the device. A crop of the central square, not of the whole
  image, and bilinear instead of the model's interpolation: documented differences from `workers`.

Batches follow `distributed.shard_bounds`: every process draws the same seeded order and crops for
the global batch and keeps its contiguous slice, so W processes see what one process would.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torchvision import transforms
from torchvision.ops import roi_align

from lnshift.data.dataset import TRAIN_SCALE, ImageDataset, make_transform
from lnshift.errors import ConfigError
from lnshift.training import distributed
from lnshift.training.distributed import shard_bounds

TRAIN_SIDE_FACTOR = 2  # crops of (0.25..1) of the area then span input..2x input pixels: never upsampled
TRAIN_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many (area, ratio) draws, then falls back
DEVICE_AUGMENTS = ("default", "none")  # "strong" (RandAugment, erasing) exists only in the workers pipeline


class TensorCache:
    """Process-wide LRU of preprocessed uint8 images, keyed by (source, sample, preprocessing), bounded in bytes."""

    def __init__(self, max_bytes: int = 8 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.numel()
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


CACHE = TensorCache()


def eval_preprocess(data_config: dict) -> transforms.Compose:
    """timm's eval transform for `data_config` up to (not including) ToTensor and Normalize, then uint8 CHW."""
    steps = make_transform(data_config, train=False).transforms
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()])


def train_side(data_config: dict) -> int:
    """Side of the central square that training crops are drawn from: TRAIN_SIDE_FACTOR x the input side."""
    return TRAIN_SIDE_FACTOR * max(data_config["input_size"][1:])


def train_preprocess(data_config: dict) -> transforms.Compose:
    """The central square at TRAIN_SIDE_FACTOR x the input side: what device crops are drawn from."""
    side = train_side(data_config)
    interpolation = transforms.InterpolationMode(data_config.get("interpolation", "bicubic"))
    return transforms.Compose(
        [transforms.Resize(side, interpolation), transforms.CenterCrop(side), transforms.PILToTensor()]
    )


class DeviceImages:
    """One split as a uint8 (N, 3, H, W) tensor and its labels on a device; `split` tags it like ImageDataset.

    `crops`: the images are kept for random-resized crops (training with augmentation); otherwise
    they are the model's input already (evaluation, or training with --augment none).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        data_config: dict,
        *,
        crops: bool,
        split: str | None = None,
    ) -> None:
        self.images = images
        self.targets = targets
        self.crops = crops
        self.split = split
        self.input_size = tuple(data_config["input_size"][1:])
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(data_config["mean"], device=images.device).view(shape)
        self.std = torch.tensor(data_config["std"], device=images.device).view(shape)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float as ToTensor then Normalize do it (the same operations, so the same bits)."""
        return x.float().div(255).sub(self.mean).div(self.std)


def preprocessed_images(
    dataset: ImageDataset,
    preprocess: Callable[[Image.Image], torch.Tensor],
    key: str,
    threads: int,
    device: torch.device,
    chunk: int = 1024,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) of the dataset's images on `device`, decoded in threads (PIL releases the GIL).

    Images go to the device a chunk at a time, so the host never holds the whole split at once; each
    preprocessed image is also kept in the process-wide CACHE.
    """
    source = dataset.source

    def one(i: int) -> torch.Tensor:
        cache_key = (source.spec, source.samples[i].path, key)
        image = CACHE.get(cache_key)
        if image is None:
            image = preprocess(source.load(i))
            CACHE.put(cache_key, image)
        return image

    indices = dataset.indices
    if not indices:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=device)
    out: torch.Tensor | None = None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for lo in range(0, len(indices), chunk):
            images = list(pool.map(one, indices[lo : lo + chunk]))
            if out is None:
                out = torch.empty((len(indices), *images[0].shape), dtype=torch.uint8, device=device)
            odd = [tuple(t.shape) for t in images if t.shape != out.shape[1:]]
            if odd:
                raise ConfigError(
                    f"{source.spec}: preprocessing gave images of different sizes {tuple(out.shape[1:])} and {odd[0]}"
                )
            out[lo : lo + len(images)] = torch.stack(images).to(device)
    return out


def decode_threads() -> int:
    """Threads that decode images for the device pipeline (PIL releases the GIL while decoding)."""
    return min(32, os.cpu_count() or 1)


def to_device(
    dataset: ImageDataset, data_config: dict, device: torch.device, *, crops: bool, threads: int | None = None
) -> DeviceImages:
    """The device version of an ImageDataset (its `split` tag travels along)."""
    preprocess = train_preprocess(data_config) if crops else eval_preprocess(data_config)
    images = preprocessed_images(dataset, preprocess, repr(preprocess), threads or decode_threads(), device)
    targets = torch.tensor(dataset.targets, dtype=torch.long, device=device)
    return DeviceImages(images, targets, data_config, crops=crops, split=getattr(dataset, "split", None))


def estimated_bytes(n_images: int, data_config: dict, *, crops: bool) -> int:
    """uint8 bytes that `to_device` will hold for n images (to decide whether they fit)."""
    side = train_side(data_config)
    h, w = (side, side) if crops else data_config["input_size"][1:]
    return n_images * 3 * h * w


def crop_boxes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) boxes x1, y1, x2, y2 drawn as torchvision's RandomResizedCrop.get_params, for n images at once."""
    area = height * width
    scale = torch.empty(n, CROP_ATTEMPTS).uniform_(*TRAIN_SCALE, generator=generator)
    log_ratio = torch.empty(n, CROP_ATTEMPTS).uniform_(*map(math.log, TRAIN_RATIO), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * scale * ratio))
    h = torch.round(torch.sqrt(area * scale / ratio))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
    pick = first.clamp(min=0).unsqueeze(1)
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    u = torch.rand(n, 2, generator=generator)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    # fallback when no attempt fits: the whole image, clamped to the ratio range, centred
    in_ratio = width / height
    if in_ratio < TRAIN_RATIO[0]:
        fw, fh = width, round(width / TRAIN_RATIO[0])
    elif in_ratio > TRAIN_RATIO[1]:
        fw, fh = round(height * TRAIN_RATIO[1]), height
    else:
        fw, fh = width, height
    none = first < 0
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    top = torch.where(none, (height - fh) // 2, top)
    left = torch.where(none, (width - fw) // 2, left)
    return torch.stack([left, top, left + w, top + h], dim=1)


@functools.cache
def fused_crops() -> bool:
    """Whether `crop_kernel` (Triton) can run: the one-kernel path on CUDA devices (asked once per process)."""
    return importlib.util.find_spec("triton") is not None


def augment(images: DeviceImages, idx: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop `boxes` of images[idx], resize to the input size, flip where `flips`, normalise.

    On CUDA this is one Triton kernel (`crop_kernel`), elsewhere `roi_align_crops`: the same
    arithmetic, so the same values to float rounding.
    """
    if images.images.is_cuda and fused_crops():
        from lnshift.data.crop_kernel import resized_crops

        return resized_crops(images.images, idx, boxes, flips, images.input_size, images.mean, images.std)
    return roi_align_crops(images, idx, boxes, flips)


def roi_align_crops(images: DeviceImages, idx: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """`augment` through torchvision's roi_align on a float copy of the sources, then flip and normalise."""
    x = images.images[idx].float()
    rois = torch.cat([torch.arange(len(idx), device=x.device, dtype=x.dtype)[:, None], boxes.to(x)], dim=1)
    out = roi_align(x, rois, output_size=images.input_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return images.normalize(torch.where(flips.to(x.device)[:, None, None, None], out.flip(-1), out))


def center_crop(images: DeviceImages, idx: torch.Tensor) -> torch.Tensor:
    """The input-size centre of images[idx] (the identity for evaluation images), normalised."""
    x = images.images[idx]
    h, w = images.input_size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return images.normalize(x[..., top : top + h, left : left + w])


class DeviceBatches:
    """Batches of a DeviceImages split, iterable like a DataLoader (with `len`) and already on the device.

    Training: `num_samples` drawn from repeated seeded permutations in batches that are all full
    (a constant shape, so torch.compile compiles once), randomly cropped and flipped when the
    images are kept for crops. Evaluation: the split in order; this process's contiguous chunk
    when `world` > 1.
    """

    def __init__(
        self,
        images: DeviceImages,
        batch_size: int,
        *,
        train: bool,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.images, self.batch_size, self.train = images, batch_size, train
        self.rank, self.world = rank, world
        self.generator = generator or torch.Generator().manual_seed(0)
        n = len(images)
        if train:
            self.n_batches = -(-(num_samples or n) // batch_size) if n else 0
        else:
            self.start, self.stop = shard_bounds(n, rank, world)
            self.n_batches = -(-(self.stop - self.start) // batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._train() if self.train else self._eval()

    def _order(self) -> torch.Tensor:
        n, need = len(self.images), self.n_batches * self.batch_size
        perms = [torch.randperm(n, generator=self.generator) for _ in range(-(-need // n))]
        return torch.cat(perms)[:need]

    def _train(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.n_batches:
            return
        device = self.images.images.device
        # the epoch's draws go to the device in one copy each: a copy from pageable host memory per
        # batch would wait for the GPU to finish the previous step, so the host could never run ahead
        order = self._order().to(device)
        if self.images.crops:
            height, width = self.images.images.shape[-2:]
            boxes = crop_boxes(len(order), height, width, self.generator).to(device)
            flips = (torch.rand(len(order), generator=self.generator) < 0.5).to(device)
        start, stop = shard_bounds(self.batch_size, self.rank, self.world)
        for lo in range(0, len(order), self.batch_size):
            sel = slice(lo + start, lo + stop)
            idx = order[sel]
            if self.images.crops:
                x = augment(self.images, idx, boxes[sel], flips[sel])
            else:
                x = center_crop(self.images, idx)
            yield x, self.images.targets[idx]

    def _eval(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.images.device
        for lo in range(self.start, self.stop, self.batch_size):
            idx = torch.arange(lo, min(lo + self.batch_size, self.stop), device=device)
            yield center_crop(self.images, idx), self.images.targets[idx]


def eval_batches(
    dataset: ImageDataset | DeviceImages, batch_size: int, workers: int = 0
) -> torch.utils.data.DataLoader | DeviceBatches:
    """Evaluation batches of either pipeline's split, in order: this process's chunk of it (distributed.py)."""
    if isinstance(dataset, DeviceImages):
        return DeviceBatches(dataset, batch_size, train=False, rank=distributed.rank(), world=distributed.world())
    return torch.utils.data.DataLoader(
        distributed.local_chunk(dataset), batch_size, num_workers=workers, pin_memory=torch.cuda.is_available()
    )
