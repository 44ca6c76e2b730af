"""The DALI backend: decodes the webdataset shards `fastrsb convert` writes (OUT/<split>/wds/).

Follows NVIDIA's DALI ResNet-50 example: decode and random crop fused in
`fn.decoders.image_random_crop`, `device="mixed"` on a GPU (nvJPEG, with `hw_decoder_load` of the
images sent to the A100/H100 hardware JPEG decoder), CPU operators with `device_id=None` without one::

    external_source (JPEG bytes, label, output size[, window])   <- the IndexPlan, in Python
    train: decoders.image_random_crop(scale 0.08-1, ratio 3/4-4/3) -> resize(linear, antialias)
           -> flip(horizontal = coin_flip)
    val:   decoders.image -> resize(window = central int(crop_pct * short side) square, cubic, antialias)

Reads: an `external_source` fed from the shared `sampling.IndexPlan` (JPEG bytes sliced out of the
memory-mapped shards at the offsets of the .idx files), rather than `fn.readers.webdataset` with
`shard_id`/`num_shards`: the reader's own shuffling is a buffer-based approximation and its sharding
splits samples, so it cannot give exact repeated augmentation or the seeded order the FFCV and PIL
backends follow. Labels come from samples.tsv, travel through the pipeline with their images, and
sizes come from samples.tsv too (the val window needs them before decoding).

Crops and flips draw from DALI's generator, seeded with `seed`: the same seed gives the same crops
for the same sequence of epochs, not the same boxes as FFCV/PIL. The output size is an argument
input fed per batch, so `set_epoch(res=...)` changes it without rebuilding the pipeline.

Measured on one H100 (RECIPES.md): mixed decode + random crop 160 + flip, hardware decoder share
1.0 / 0.65 / 0: 19-25.6k / 18.7-19k / 9.2-9.8k img/s; hence the default hw_decoder_load=1.0.
"""
from __future__ import annotations

import numpy as np

from fastrsb.errors import FastRSBError, missing_extra

from . import sampling
from .layout import ShardBytes, ShardIndex

try:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise missing_extra("nvidia-dali", "dali") from e

# Preallocation sizes of NVIDIA's DALI ResNet-50 example (avoid regrowing nvJPEG buffers).
_DEVICE_MEMORY_PADDING = 211025920
_HOST_MEMORY_PADDING = 140544512


class PlanSource:
    """external_source callback: one planned batch per call, StopIteration at the end of the epoch."""

    def __init__(self, index: ShardIndex, train: bool, crop_pct: float):
        self.read = ShardBytes(index)
        self.index = index
        self.train = train
        self.crop_pct = crop_pct
        self.batches: list[np.ndarray] = []
        self.k = 0
        self.res = 0

    def start(self, batches, res: int):
        self.batches, self.k, self.res = batches, 0, int(res)

    def __call__(self):
        if self.k >= len(self.batches):
            raise StopIteration
        ids = self.batches[self.k] & sampling.SAMPLE_MASK
        self.k += 1
        jpegs = self.read.batch(ids)
        labels = self.index.labels[ids]
        size = np.full((ids.size, 2), self.res, dtype=np.float32)
        if self.train:
            return jpegs, labels, size
        h, w = self.index.heights[ids], self.index.widths[ids]
        c = np.floor(self.crop_pct * np.minimum(h, w)).astype(np.int64)
        top, left = (h - c) // 2, (w - c) // 2
        start = np.stack([top, left], axis=1).astype(np.float32)
        end = np.stack([top + c, left + c], axis=1).astype(np.float32)
        return jpegs, labels, size, start, end


def build_pipeline(source: PlanSource, *, batch_size: int, num_threads: int, device_id, train: bool, seed: int,
                   scale, ratio, hw_decoder_load: float) -> Pipeline:
    mixed = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2)
    n = 3 if train else 5
    with pipe:
        outs = fn.external_source(source=source, num_outputs=n, batch=True,
                                  dtype=[types.UINT8, types.INT64] + [types.FLOAT] * (n - 2))
        jpegs, labels, size = outs[:3]
        decoder = dict(device="mixed", hw_decoder_load=hw_decoder_load, device_memory_padding=_DEVICE_MEMORY_PADDING,
                       host_memory_padding=_HOST_MEMORY_PADDING) if mixed else dict(device="cpu")
        if train:
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(scale),
                                                   random_aspect_ratio=list(ratio), num_attempts=10, seed=seed,
                                                   **decoder)
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5, seed=seed + 1))
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            images = fn.resize(images, size=size, roi_start=outs[3], roi_end=outs[4], roi_relative=False,
                               interp_type=types.INTERP_CUBIC, antialias=True)
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


class DALILoader:
    """Backend 'dali'. Use fastrsb.data.make_loader rather than this class directly."""

    backend = "dali"

    def __init__(self, data, split, *, batch_size, res, device, train: bool, seed: int, crop_pct: float, scale,
                 ratio, num_workers: int, num_classes: int, hw_decoder_load: float, plan_kwargs: dict):
        import torch

        self.device = torch.device(device)
        index = ShardIndex.load(data, split)
        self.num_samples = len(index)
        self.num_classes = num_classes
        self.plan = sampling.IndexPlan(self.num_samples, batch_size, **plan_kwargs)
        self.source = PlanSource(index, train, crop_pct)
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise FastRSBError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        self.pipe = build_pipeline(self.source, batch_size=batch_size, num_threads=max(1, num_workers),
                                   device_id=device_id, train=train, seed=seed, scale=scale, ratio=ratio,
                                   hw_decoder_load=hw_decoder_load)
        self._state = "new"  # new | running | exhausted

    def _finish_epoch(self):
        # DALI prefetches from the source; an abandoned epoch is cut at what was already fed (at most
        # prefetch_queue_depth batches), those are run, then the pipeline is reset.
        if self._state == "running":
            self.source.batches = self.source.batches[:self.source.k]
            try:
                while True:
                    self.pipe.run()
            except StopIteration:
                self._state = "exhausted"
        if self._state == "exhausted":
            self.pipe.reset()

    def iter_epoch(self, epoch: int, res: int):
        """Batches of `epoch` at `res` (the output size is fed per batch: no pipeline rebuild)."""
        import torch

        self._finish_epoch()
        self.source.start(self.plan.batches(epoch), res)
        self._state = "running"
        cuda = self.device.type == "cuda"
        if cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray
        while True:
            try:
                images, labels = self.pipe.run()
            except StopIteration:
                self._state = "exhausted"
                return
            labels = torch.from_numpy(labels.as_array()).view(-1)
            if cuda:
                images = images.as_tensor()
                out = torch.empty(images.shape(), dtype=torch.uint8, device=self.device)
                feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.device))
                yield out.permute(0, 3, 1, 2), labels.to(self.device, non_blocking=True)
            else:
                yield torch.from_numpy(images.as_array()).permute(0, 3, 1, 2), labels
