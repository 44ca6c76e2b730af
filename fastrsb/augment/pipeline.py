"""The trainer's train augmentation: RandAugment -> mixup/cutmix -> normalise, on a device batch.

As timm's train pipeline (timm 1.0: `create_transform` with `auto_augment`, then `Mixup` and the
prefetcher's normalisation), minus decode, random-resized-crop and flip, which the loaders do
(fused with decoding; they honour `recipe.hflip`).

A call has a host part and a device part. The host part draws every random decision with numpy
(seeded from the optional CPU `torch.Generator`) and packs them into one float64 array; one pinned,
non-blocking copy takes it to the device. The device part (`TrainAugment.apply_packed`: params
tensor -> images, targets) runs the same kernels for every draw, with constants cached per device,
and never synchronises with the host, so `TrainAugment.compile()` can wrap it in
`torch.compile(fullgraph=True, dynamic=False)` (one compile per input shape; RandAugment's stage caps
are fixed per batch size, except in calls whose draws overflow them, p about 1e-9 per stage).

The pixel work is one kernel per step (`kernels`: numba on the CPU, Triton on CUDA), mixup/cutmix and
the normalisation fused into one. Measured (`fastrsb bench aug --quick --batches 256,512,2048`: 2-core
AMD EPYC, torch 2.14.1, timm 1.0.31; A3's rand-m6-mstd0.5-inc1 + mixup 0.1 / cutmix 1.0, 160 px; at
commit c6a356b, benchmarks/results/cpu-2core-aug-c6a356b-2026-12-07.jsonl, 3 repeats): the eager device
part reads and writes 1.45 / 1.33 / 1.20 MiB per image at batch 256 / 512 / 2048 in 235 ops (34.9 /
29.1 / 22.8 MiB in 610 before, at 11aa6ab), the compiled graph 1.35 / 1.16 / 1.05 MiB in 48 kernels;
eager, 256 images take 88 / 86 / 76 ms against 104 / 102 / 97 ms for timm's PIL RandAugment on two
worker processes + Mixup + normalise in the same run. The design targets the GPU, compiled: <= 0.6 ms
per 256 images at batch 2048 and <= 5 ms at 256 on one H100; not yet measured on a GPU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .mixup import NUM_COLUMNS as MIX_COLUMNS, MixupCutmix, smooth_one_hot
from . import kernels
from .ops import TIMM_FILL, check_images, host_rng, memory_format, to_device
from .rand_augment import RandAugment

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_NORMALIZE_CONSTANTS: dict = {}


def _normalize_constants(device: torch.device, mean: Sequence[float], std: Sequence[float]):
    key = (str(device), tuple(mean), tuple(std))
    if key not in _NORMALIZE_CONSTANTS:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        _NORMALIZE_CONSTANTS[key] = ((1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device))
    return _NORMALIZE_CONSTANTS[key]


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD, dtype: torch.dtype = torch.float32) -> Tensor:
    """(images / 255 - mean) / std for uint8 or float images in 0..255; keeps channels_last."""
    check_images(images, "normalize", uint8=False)
    if not dtype.is_floating_point:
        raise TypeError(f"normalize: dtype must be floating point, got {dtype}")
    return _normalized(images, mean, std, dtype).contiguous(memory_format=memory_format(images))


def _normalized(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
                consts: tuple[Tensor, Tensor] | None = None) -> Tensor:
    scale, shift = consts if consts is not None else _normalize_constants(images.device, mean, std)
    # one op, x * scale + shift in float32 (uint8 promotes), never in place: the caller's images stay
    return torch.addcmul(shift, images, scale).to(dtype)


class TrainAugment:
    """RandAugment -> mixup/cutmix -> normalise (see make_train_augment).

    `augment(images_uint8_nchw, labels_int64, generator=None)` -> (images in `dtype`, channels_last;
    float32 targets (B, num_classes)). Either stage may be None; targets are then the smoothed one-hot.
    """

    def __init__(self, rand_augment: RandAugment | None, mixup: MixupCutmix | None, label_smoothing: float,
                 num_classes: int, dtype: torch.dtype = torch.float32,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"train augment: dtype must be floating point, got {dtype}")
        self.rand_augment = rand_augment
        self.mixup = mixup
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.mean, self.std = tuple(mean), tuple(std)
        self._device_part = self.apply_packed
        self.compiled = False

    def compile(self) -> "TrainAugment":
        """Run the device part through torch.compile(fullgraph=True, dynamic=False) from now on."""
        self._device_part = torch.compile(self.apply_packed, fullgraph=True, dynamic=False)
        self.compiled = True
        return self

    def sample_params(self, batch_size: int, height: int, width: int,
                      generator: torch.Generator | None = None) -> dict:
        """Every random decision of one call, on the host: {'rand_augment': ..., 'mixup': ...} (None where off)."""
        if self.mixup is not None and batch_size % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {batch_size}")
        rng = host_rng(generator)  # one seed per call; every draw below is on the host
        ra = self.rand_augment.sample_params(batch_size, rng=rng) if self.rand_augment is not None else None
        mix = self.mixup.sample_params(batch_size, height, width, rng=rng) if self.mixup is not None else None
        return {"rand_augment": ra, "mixup": mix}

    def pack(self, params: dict, height: int, width: int) -> tuple[np.ndarray, tuple]:
        """The params of one call as one (batch, columns) float64 array (RandAugment's, then mixup's) and
        RandAugment's stage caps (see `RandAugment.pack`)."""
        parts, caps = [], ()
        if self.rand_augment is not None:
            ra, caps = self.rand_augment.pack(params["rand_augment"], height, width)
            parts.append(ra)
        if self.mixup is not None:
            parts.append(MixupCutmix.pack(params["mixup"]))
        return (np.concatenate(parts, axis=1) if parts else np.zeros((0, 0))), caps

    def constants(self, device: torch.device, height: int, width: int) -> dict:
        """Every device constant of a call at this size, made (once) outside the device part: a compiled
        device part then only reads its arguments, so filling a cache never invalidates its graph."""
        return {"rand_augment": self.rand_augment.constants(device, height, width) if self.rand_augment else None,
                "normalize": _normalize_constants(device, self.mean, self.std)}

    def apply_packed(self, images: Tensor, labels: Tensor, packed: Tensor, caps: tuple,
                     consts: dict | None = None) -> tuple[Tensor, Tensor]:
        """The device part: same kernels for every draw (given `pack`'s caps), no host synchronisation.
        `consts`: `constants(...)`."""
        if consts is None:
            consts = self.constants(images.device, images.shape[2], images.shape[3])
        x = images
        if self.rand_augment is not None:
            x = self.rand_augment.apply_packed(x, packed[:, :self.rand_augment.num_columns], caps,
                                               consts["rand_augment"])
        if self.mixup is not None:  # one kernel: `MixupCutmix.apply_packed`, then `normalize`, in one pass
            mix = packed[:, packed.shape[1] - MIX_COLUMNS:]
            scale, shift = consts["normalize"]
            return kernels.mix_normalize(x, mix, scale, shift, self.dtype), self.mixup.targets(labels, mix)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        out = _normalized(x, self.mean, self.std, self.dtype, consts["normalize"])
        return out.contiguous(memory_format=torch.channels_last), targets

    def apply_params(self, images: Tensor, labels: Tensor, params: dict) -> tuple[Tensor, Tensor]:
        """Apply the draws of `sample_params`: at most one host-to-device copy, then the device part."""
        _, _, h, w = images.shape
        packed, caps = self.pack(params, h, w)
        packed_d = to_device(packed, images.device) if packed.size else packed_placeholder(images.device)
        with kernels.cpu_threads(images.device):
            return self._device_part(images, labels, packed_d, caps, self.constants(images.device, h, w))

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        check_images(images, "train augment", uint8=True)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be shaped ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        _, _, h, w = images.shape
        return self.apply_params(images, labels, self.sample_params(images.shape[0], h, w, generator))


_PLACEHOLDERS: dict = {}


def packed_placeholder(device: torch.device) -> Tensor:
    """An empty params tensor for an augmentation without random stages (no copy at all)."""
    key = str(device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros((0, 0), dtype=torch.float64, device=device)
    return _PLACEHOLDERS[key]


def recipe_augment_kwargs(recipe) -> dict:
    """The recipe's settings of `make_train_augment` (all but num_classes and dtype), for one place to read them."""
    return dict(rand_augment=recipe.rand_augment, mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha,
                label_smoothing=recipe.label_smoothing, mixup_prob=recipe.mixup_prob,
                switch_prob=recipe.mixup_switch_prob, interpolation=recipe.interpolation)


def make_train_augment(rand_augment: str | None, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float,
                       num_classes: int, *, mixup_prob: float = 1.0, switch_prob: float = 0.5,
                       dtype: torch.dtype = torch.float32, mixup_mode: str = "batch",
                       fill: int | Sequence[int] = TIMM_FILL, interpolation: str = "random") -> TrainAugment:
    """The trainer's augmentation: `(images_uint8, labels_int64, generator=None) -> (images, targets)`.

    rand_augment: timm string ('rand-m6-mstd0.5-inc1') or None/'' for none. Mixup/cutmix is off when
    both alphas are 0; targets are then the (smoothed) one-hot labels. `fill` and `interpolation` are
    RandAugment's (timm's create_transform defaults). Call `.compile()` on the result to compile its
    device part.
    """
    ra = RandAugment.from_timm(rand_augment, fill=fill, interpolation=interpolation) if rand_augment else None
    mix = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        mix = MixupCutmix(mixup_alpha, cutmix_alpha, prob=mixup_prob, switch_prob=switch_prob, mode=mixup_mode,
                          label_smoothing=label_smoothing, num_classes=num_classes)
    return TrainAugment(ra, mix, label_smoothing, num_classes, dtype)
