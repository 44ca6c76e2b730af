"""The FFCV backend: reads OUT/<split>/<split>.beton (Leclerc et al., "FFCV", CVPR 2023; ffcv-imagenet).

Pipeline, one list per field, with one visible point where work moves to the GPU (`ToDevice`)::

    image: SeededResizedCropDecoder (decode + crop box + antialiased resize + flip)
           -> ToTensor -> ToDevice(non_blocking) [CUDA only] -> ToTorchImage(channels_last)
    label: TaggedIntDecoder -> ToTensor -> ToDevice(non_blocking) [CUDA only]

Differences from ffcv-imagenet's `RandomResizedCropRGBImageDecoder` + `RandomHorizontalFlip`, and why:

- FFCV's crop and flip draw from numba's thread-local, unseeded `np.random`, so the same seed does not
  give the same crops. Our decoder subclasses FFCV's `ResizedCropRGBImageDecoder` (same JPEG decode)
  but takes the box, the flip and the filter from `sampling.CropSpec` (`random_resized_crop`,
  `use_bicubic`), a pure function of (seed, tagged read); the flip is fused into the resize. The PIL
  and DALI backends draw the same boxes, so a fresh loader at epoch e repeats a run's epoch e.
- Resize: not FFCV's `resize_crop` (OpenCV INTER_AREA, fixed in libffcv, which upsamples almost like
  nearest-neighbour) but `resample.resize_box`, a numba port of Pillow's antialiased bilinear/bicubic
  resampling: train reads bilinear or bicubic per read ("random", timm's default) or as `interpolation` says,
  val bicubic. Train boxes are cut out before the resize (timm's `F.resized_crop`); eval boxes are resized
  within the image, reading the pixels around the box as timm's resize of the whole image does
  (`CropSpec.crop_first`). Its cost against INTER_AREA is not in benchmarks/results yet.
- Pixels vs the PIL backend: libffcv decodes with libjpeg-turbo's fast integer DCT (TJFLAG_FASTDCT),
  PIL with the accurate one: per-image mean |diff| about 1 grey level (`fastrsb bench parity`).
- Order: the Loader gets a `TraversalOrder` that returns `IndexPlan.tagged(epoch)` (DDP shard,
  accumulation micro-shards, repeated augmentation, seeded shuffle). The tag bits above the sample
  index (copy number, epoch) reach the decoder, which is how the 3 copies of a repeated sample get 3
  different crops; decoders mask them off before reading. Nothing is rebuilt or recompiled between
  epochs: the order is a per-epoch call, and a new resolution is a new `output_size`, which FFCV reads
  when it allocates the epoch's buffers (the JIT code does not depend on it; ffcv-imagenet's
  progressive resizing does the same).

Measured here on the CPU only (benchmarks/results/cpu-2core-2026-11-26.jsonl: 1,116 img/s train at 160 on
2 cores, with INTER_AREA).
"""
from __future__ import annotations

import queue

import numpy as np

from fastrsb.errors import FastRSBError, missing_extra

from . import layout, registry, resample, sampling


def _open(data, split, **kw):
    return FFCVLoader(data, split, **kw)


registry.register(registry.Backend(
    name="ffcv", reads="{split}/{split}.beton", convert_format="beton",
    has_data=lambda data, split: layout.beton_path(data, split).is_file(),
    open=_open, prior_cuda=1, prior_cpu=0))

try:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.loader import Loader
    from ffcv.pipeline.compiler import Compiler
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise missing_extra("ffcv", "ffcv") from e


class SeededResizedCropDecoder(ResizedCropRGBImageDecoder):
    """Decode + crop + resize (+ flip) with crops, flips and filters drawn from (seed, tagged read).

    train=True: torchvision RandomResizedCrop geometry, a horizontal flip with p=crop.hflip, bilinear or
    bicubic per crop.interpolation, the box cut out before the resize (`CropSpec.crop_first`). train=False:
    timm's eval box (`sampling.center_crop_box`: the source box of resize-short-side-to-floor(res / crop_pct)
    then centre crop, fractional), bicubic. Resized by `resample.resize_box` (PIL's filters), which takes
    fractional boxes as PIL does.
    """

    def __init__(self, output_size, crop: sampling.CropSpec):
        super().__init__(output_size)
        self.crop = crop

    @property
    def get_crop_generator(self):  # abstract in FFCV; our generate_code does not use it
        return None

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        read_box = sampling.numba_functions().read_box
        resize_box = resample.numba_functions()[1]
        mask = sampling.SAMPLE_MASK
        seed, train, crop_pct, s_lo, s_hi, lr_lo, lr_hi, flip_p, mode = self.crop.box_args
        crop_first = self.crop.crop_first

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
                res = np.int64(destination.shape[1])  # output_size, set per epoch
                i, j, h, w, flip, bicubic = read_box(np.int64(height), np.int64(width), np.int64(tagged), res, seed,
                                                     train, crop_pct, s_lo, s_hi, lr_lo, lr_hi, flip_p, mode)
                resize_box(temp_buffer, i, j, h, w, destination[dst_ix], bicubic, flip, crop_first)
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
    """A TraversalOrder that returns `plan.tagged(epoch)`, from its read `start` on (0: all of it).

    ffcv 1.0's Loader accepts an *instance* (`isinstance(order, TraversalOrder)`) and then calls it
    with the loader, so the instance binds itself on that call.
    """

    def __init__(self, plan: sampling.IndexPlan):  # noqa: super().__init__ needs the loader: see __call__
        self.plan = plan
        self.start = 0

    def __call__(self, loader):
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int):
        return self.plan.tagged(epoch)[self.start:]


class FFCVLoader:
    """Backend 'ffcv'. Use fastrsb.loaders.make_loader rather than this class directly."""

    backend = "ffcv"

    def __init__(self, data, split, *, batch_size, res, device, crop: sampling.CropSpec, num_workers: int,
                 plan_kwargs: dict, options: dict, batches_ahead: int = 3):
        import torch

        path = layout.beton_path(data, split)
        if not layout.is_converted(data):
            raise FastRSBError(f"{data} is not a converted dataset (no classes.json): run "
                               f"fastrsb convert SRC {data} --format beton")
        self.device = torch.device(device)
        self.classes = layout.read_classes(data)
        # Fresh operation objects for every Loader: FFCV keeps per-Loader state in them.
        self.decoder = SeededResizedCropDecoder((res, res), crop)
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
        self.order = PlanOrder(self.plan)
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=True,
                             order=self.order, drop_last=self.plan.drop_last,
                             pipelines={"image": image, "label": label}, batches_ahead=batches_ahead, seed=0)

    def iter_epoch(self, epoch: int, res: int, start: int = 0):
        """Batches start, start + 1, ... of `epoch` at `res` (a new output size needs no recompilation)."""
        import torch

        if start >= self.plan.batches_per_epoch:
            return
        self.decoder.output_size = (int(res), int(res))
        self.order.start = int(start) * self.plan.batch_size  # FFCV batches the order it is given
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
