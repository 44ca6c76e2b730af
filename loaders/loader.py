"""The loader contract: one `make_loader` over every registered backend, so the trainer never branches on one.

    loader = make_loader("auto", "OUT", "train", batch_size=256, res=160, device="cuda", seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch, res=res_for(epoch))     # reshuffle; progressive resizing
        for images, labels in loader:                    # already on `device`
            ...                                          # images: uint8 NCHW channels_last; labels: int64

`data` is the folder `fastrsb convert` wrote, or, for a backend that reads source folders (PIL), a
source ImageFolder root (`<split>/<class>/*`).

Train split: random-resized-crop (scale 0.08-1, ratio 3/4-4/3) fused with decoding, resized to `res`
with an antialiased bilinear or bicubic filter (`interpolation`: fixed, or "random" per read as timm's
`transforms_imagenet_train`), then a horizontal flip with probability `hflip` (the recipe's): the only
flip of the pipeline. Val split: timm's eval transform (short side resized to floor(res / crop_pct),
centre crop res x res), read as one source box (`sampling.center_crop_box`) and resized antialiased
bicubic. Every backend uses PIL's filters: PIL itself; FFCV a numba port of Pillow's resampling
(`resample.py`; FFCV's own OpenCV INTER_AREA is not used); DALI `fn.resize` with the same filter per
sample (antialias on). The pixels differ only by the JPEG decoder (libjpeg-turbo in PIL and FFCV, nvJPEG
/ libjpeg-turbo in DALI) and rounding: `fastrsb bench parity` measures the gap. Reads (order, DDP
shards, repeated augmentation, pads) and crops come from one `sampling.IndexPlan` and `sampling.CropSpec`, identical
for all backends. Iterating twice without `set_epoch` repeats the epoch (as torch's DistributedSampler does).
`set_epoch(epoch, start_batch=k)` starts the epoch at its batch k (a run resumed mid-epoch): the
plan is a pure function of (seed, epoch), so the first k batches are skipped without being read, and
batch k onwards are those of an epoch read from its start, bit for bit.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fastrsb.errors import FastRSBError

from . import registry
from .auto import resolve_auto
from .sampling import INTERPOLATIONS, CropSpec


class Loader:
    """What make_loader returns: `for images, labels in loader`, `len(loader)`, `set_epoch`.

    Attributes: backend (its registered name), num_samples (samples in the split), classes (the class
    names, label = position), num_classes,
    samples_per_epoch (what this rank yields per epoch), device, res, reason (why `auto` chose it),
    plan and crop (the `sampling.IndexPlan` and `sampling.CropSpec` its reads follow: what a reference
    implementation needs to redo a batch, as `fastrsb bench parity` does with timm's transforms).
    """

    def __init__(self, impl, *, res: int, crop: CropSpec, reason: str = ""):
        self._impl = impl
        self.plan = impl.plan
        self.crop = crop
        self.backend = impl.backend
        self.num_samples = int(impl.num_samples)
        self.classes = list(impl.classes)
        self.num_classes = len(self.classes)
        self.samples_per_epoch = impl.plan.reads_per_epoch
        self.device = impl.device
        self.res = res
        self.epoch = 0
        self.start_batch = 0
        self.reason = reason

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self._impl.plan.batches_per_epoch

    def set_epoch(self, epoch: int, res: int | None = None, start_batch: int = 0) -> None:
        """Select the epoch's order (seed, epoch), for the train split a new resolution, and the batch
        the epoch's iteration starts at (0: all of it; k: the epoch's batches k, k + 1, ...)."""
        if res is not None:
            check_res(res)
            self.res = int(res)
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise FastRSBError(f"start_batch {start_batch!r}: give a batch of the epoch, 0 to {len(self)}")
        self.epoch = int(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        # The backends keep no epoch, resolution or start of their own: the wrapper hands them over.
        return self._impl.iter_epoch(self.epoch, self.res, start=self.start_batch)

    def __repr__(self):
        return (f"Loader(backend={self.backend!r}, num_samples={self.num_samples}, num_classes={self.num_classes}, "
                f"batches={len(self)}, res={self.res}, device={self.device})")


def check_res(res):
    if not isinstance(res, int) or isinstance(res, bool) or res <= 0:
        raise FastRSBError(f"resolution must be a positive integer number of pixels, got {res!r}")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_loader(backend: str, data, split: str, *, batch_size: int, res: int, device="cpu", rank: int = 0,
                world_size: int = 1, seed: int = 0, aug_repeats: int = 0, crop_pct: float = 0.875,
                drop_last: bool | None = None, num_workers: int | None = None, shuffle: bool | None = None,
                pad: bool = True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                interpolation: str = "random", accum_steps: int = 1, hw_decoder_load: float = 1.0,
                prefetch_depth: int = 2, verbose: bool = True, probe: bool = True) -> Loader:
    """Build a loader for `split` ('train' augments; any other split is evaluated) of `data`.

    drop_last / shuffle default to True for 'train' and False otherwise. pad=True extends every rank
    to ceil(N / world_size) samples by wrapping around (each sample read at least once; a few twice),
    pad=False cuts to floor(N / world_size) (up to world_size - 1 samples skipped per epoch).
    aug_repeats=R >= 2: repeated augmentation (each read sample R times, epoch length unchanged).
    hflip: probability of the horizontal flip of a train read (0 turns it off).
    interpolation: the train resize filter, "bilinear", "bicubic" or "random" (one of the two per read,
        drawn from (seed, read) as timm's `random` interpolation); eval is always bicubic. Every backend
        resizes antialiased with PIL's filters (see the module docstring).
    accum_steps: micro-batches per optimizer step (train split). The epoch is cut into
        world_size x accum_steps micro-shards, so with aug_repeats=R the R copies of a sample land in R
        different micro-batches when world_size x accum_steps >= R (sampling.IndexPlan). Needs drop_last.
    num_workers: threads (FFCV, DALI) or processes (PIL); default: the cores this process may use.
    hw_decoder_load: the share of JPEGs DALI's mixed decoder sends to the hardware decoder (others ignore it).
    prefetch_depth: batches DALI runs ahead of the consumer (its prefetch_queue_depth; others ignore it).
    backend='auto': on a converted dataset, the fastest candidate by `auto.probe_backends` (a measurement
        of a few train batches per backend, cached in the dataset folder; under DDP rank 0 measures and
        broadcasts its choice); probe=False uses a cached measurement or else the prior order.
    """
    import torch

    check_res(res)
    if batch_size < 1:
        raise FastRSBError(f"batch_size must be positive, got {batch_size}")
    if not 0 < crop_pct <= 1:
        raise FastRSBError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if not 0.0 <= hflip <= 1.0:
        raise FastRSBError(f"hflip must be a probability in [0, 1], got {hflip}")
    if interpolation not in INTERPOLATIONS:
        raise FastRSBError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise FastRSBError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastRSBError(f"device {device} asked for but CUDA is not available: pass device='cpu' "
                           "or run on a machine with a GPU and a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise FastRSBError(f"device must be cpu or cuda, got {device}")
    data = Path(data)
    if not data.exists():
        fmt = f" --format {registry.get(backend).convert_format}" if backend != "auto" else ""
        raise FastRSBError(f"{data} does not exist: run fastrsb convert SRC {data}{fmt}")
    train = split == "train"
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    num_workers = num_workers or default_workers()

    reason = ""
    if backend == "auto":
        backend, reason = resolve_auto(data, split, device, make_loader=make_loader, rank=rank, world_size=world_size,
                                       res=res, batch_size=batch_size, num_workers=num_workers, probe=probe)
        if verbose:
            print(f"fastrsb: loader backend 'auto' -> '{backend}' ({reason})", file=sys.stderr, flush=True)
    spec = registry.get(backend)
    if not registry.usable(backend):
        raise FastRSBError(registry.why_unusable(backend))
    if not spec.has_data(data, split):
        raise FastRSBError(f"{data} has no {spec.reads.format(split=split)}: run "
                           f"fastrsb convert SRC {data} --format {spec.convert_format}")
    plan_kwargs = dict(rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, aug_repeats=aug_repeats,
                       drop_last=drop_last, pad=pad, accum_steps=accum_steps if train else 1)
    crop = CropSpec(train=train, seed=seed, crop_pct=crop_pct, scale=tuple(scale), ratio=tuple(ratio),
                    hflip=float(hflip) if train else 0.0, interpolation=interpolation)
    impl = spec.open(data, split, batch_size=batch_size, res=res, device=device, num_workers=num_workers,
                     plan_kwargs=plan_kwargs, crop=crop,
                     options={"hw_decoder_load": hw_decoder_load, "prefetch_depth": prefetch_depth})
    return Loader(impl, res=res, crop=crop, reason=reason)
