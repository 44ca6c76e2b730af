"""The FFCV backend: reads OUT/<split>/<split>.beton (Leclerc et al., "FFCV", CVPR 2023; ffcv-imagenet).

Pipeline, one list per field, with one visible point where work moves to the GPU (`ToDevice`)::

    image: SeededResizedCropDecoder (decode + random-resized-crop + flip, or center window)
           -> ToTensor -> ToDevice(non_blocking) [CUDA only] -> ToTorchImage(channels_last)
    label: TaggedIntDecoder -> ToTensor -> ToDevice(non_blocking) [CUDA only]

Differences from ffcv-imagenet's `RandomResizedCropRGBImageDecoder` + `RandomHorizontalFlip`, and why:

- FFCV's crop and flip draw from numba's thread-local, unseeded `np.random`, so the same seed does not
  give the same crops. Our decoder subclasses FFCV's `ResizedCropRGBImageDecoder` (same JPEG decode and
  same `resize_crop` C call) but takes the box and the flip from `sampling.random_resized_crop`, a
  pure function of (seed, tagged read); the flip is fused into the decoder. The PIL backend draws the
  same boxes.
- Order: the Loader gets a `TraversalOrder` that returns `IndexPlan.tagged(epoch)` (DDP shard,
  repeated augmentation, seeded shuffle). The tag bits above the sample index (copy number, epoch)
  reach the decoder, which is how the 3 copies of a repeated sample get 3 different crops; decoders
  mask them off before reading. Nothing is rebuilt or recompiled between epochs: the order is a
  per-epoch call, and a new resolution is a new `output_size`, which FFCV reads when it allocates the
  epoch's buffers (the JIT code does not depend on it; ffcv-imagenet's progressive resizing does the
  same).
- Interpolation: FFCV's `resize_crop` is OpenCV `INTER_AREA`, fixed in libffcv; for train and val.

Measured here on the CPU only (benchmarks/results/cpu-2core-2026-11-26.jsonl: 1,116 img/s train at 160 on
2 cores); public: FFCV's ImageNet example trains ResNet-50 at res 160-192 on 8 A100s, 88 epochs in 77 min.
"""
from __future__ import annotations

import math
import queue

import numpy as np

from fastrsb.errors import FastRSBError, missing_extra

from . import sampling
from .layout import beton_path

try:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader
    from ffcv.pipeline.compiler import Compiler
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise missing_extra("ffcv", "ffcv") from e


class SeededResizedCropDecoder(ResizedCropRGBImageDecoder):
    """Decode + crop + resize (+ flip) with crops drawn from (seed, tagged read).

    train=True: torchvision RandomResizedCrop geometry and a horizontal flip with p=1/2.
    train=False: the central int(crop_pct * short side) square (FFCV's CenterCropRGBImageDecoder).
    """

    def __init__(self, output_size, *, train: bool, seed: int, crop_pct: float = 0.875,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(output_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.crop_pct = float(crop_pct)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)

    @property
    def get_crop_generator(self):  # abstract in FFCV; our generate_code does not use it
        return None

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        read_key, _, rrc = sampling.numba_functions()
        mask = sampling.SAMPLE_MASK
        train, seed, crop_pct = self.train, self.seed, self.crop_pct
        s_lo, s_hi = self.scale
        lr_lo, lr_hi = math.log(self.ratio[0]), math.log(self.ratio[1])

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                tagged = batch_indices[dst_ix]
                field = metadata[tagged & mask]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                if train:
                    i, j, h, w, flip = rrc(np.int64(height), np.int64(width), read_key(seed, np.int64(tagged)),
                                           s_lo, s_hi, lr_lo, lr_hi)
                else:
                    c = np.int64(crop_pct * min(height, width))
                    i, j, h, w, flip = (np.int64(height) - c) // 2, (np.int64(width) - c) // 2, c, c, 0
                out = destination[dst_ix]
                resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                if flip:
                    ow = out.shape[1]
                    for r in range(out.shape[0]):
                        for col in range(ow // 2):
                            for ch in range(3):
                                tmp = out[r, col, ch]
                                out[r, col, ch] = out[r, ow - 1 - col, ch]
                                out[r, ow - 1 - col, ch] = tmp
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class TaggedIntDecoder(IntDecoder):
    """FFCV's IntDecoder for tagged reads (the tag bits are masked off)."""

    def generate_code(self):
        mask = sampling.SAMPLE_MASK

        def decoder(indices, destination, metadata, storage_state):
            for ix in range(len(indices)):
                destination[ix] = metadata[indices[ix] & mask]
            return destination[:len(indices)]

        return decoder


class PlanOrder(TraversalOrder):
    """A TraversalOrder that returns `plan.tagged(epoch)`.

    ffcv 1.0's Loader accepts an *instance* (`isinstance(order, TraversalOrder)`) and then calls it
    with the loader, so the instance binds itself on that call.
    """

    def __init__(self, plan: sampling.IndexPlan):  # noqa: super().__init__ needs the loader: see __call__
        self.plan = plan

    def __call__(self, loader):
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int):
        return self.plan.tagged(epoch)


class FFCVLoader:
    """Backend 'ffcv'. Use fastrsb.data.make_loader rather than this class directly."""

    backend = "ffcv"

    def __init__(self, data, split, *, batch_size, res, device, train: bool, seed: int, crop_pct: float,
                 scale, ratio, num_workers: int, num_classes: int, plan_kwargs: dict, batches_ahead: int = 3):
        import torch

        path = beton_path(data, split)
        if not path.is_file():
            raise FastRSBError(f"no FFCV file {path}: run fastrsb convert SRC {data} --format beton")
        self.device = torch.device(device)
        self.num_classes = num_classes
        # Fresh operation objects for every Loader: FFCV keeps per-Loader state in them.
        self.decoder = SeededResizedCropDecoder((res, res), train=train, seed=seed, crop_pct=crop_pct,
                                                scale=scale, ratio=ratio)
        cuda = self.device.type == "cuda"
        image = [self.decoder, ToTensor()]
        label = [TaggedIntDecoder(), ToTensor()]
        if cuda:  # the one point where work moves to the GPU
            image.append(ToDevice(self.device, non_blocking=True))
            label.append(ToDevice(self.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True, convert_back_int16=False))

        from ffcv.reader import Reader

        self.num_samples = int(Reader(str(path)).num_samples)
        self.plan = sampling.IndexPlan(self.num_samples, batch_size, **plan_kwargs)
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=True,
                             order=PlanOrder(self.plan), drop_last=self.plan.drop_last,
                             pipelines={"image": image, "label": label}, batches_ahead=batches_ahead, seed=0)

    def iter_epoch(self, epoch: int, res: int):
        """Batches of `epoch` at `res` (a new output size needs no recompilation)."""
        import torch

        self.decoder.output_size = (int(res), int(res))
        self.loader.next_epoch = int(epoch)
        it = iter(self.loader)
        cuda = self.device.type == "cuda"
        try:
            while True:
                # FFCV's own __next__ blocks forever when its thread died on an exception.
                try:
                    item = it.output_queue.get(timeout=1.0)
                except queue.Empty:
                    if not it.is_alive() and it.output_queue.empty():
                        raise FastRSBError("the FFCV loader thread stopped with an error (traceback above)")
                    continue
                if item is None:
                    break
                slot, (images, labels) = item
                if cuda:
                    it.current_stream.wait_stream(it.cuda_streams[slot])
                    yield images, labels.view(-1)
                else:
                    # FFCV reuses its batches_ahead + 2 output buffers; on the CPU nothing orders the
                    # reuse after the caller's work, so we hand out copies.
                    yield images.clone(memory_format=torch.channels_last), labels.view(-1).clone()
        finally:
            it.close()
