"""Index plans: which samples each rank reads in an epoch, in which order, and their seeded crops.

One plan drives every backend (FFCV, DALI, PIL), so with the same seed they read the same samples in
the same order and yield the same labels batch by batch.

Order of an epoch (`IndexPlan.epoch`):

1. a permutation of the split, drawn from `numpy.random.Generator(PCG64([seed, epoch]))` (the
   identity when `shuffle=False`, e.g. for validation);
2. repeated augmentation (`aug_repeats=R >= 2`, RSB A1/A2 with R=3): each index of the permutation is
   repeated R times in a row, `[a, a, a, b, b, b, ...]`, as timm's `RepeatAugSampler` does;
3. sharding into micro-shards: with W processes and A accumulation steps (`accum_steps`) the list
   is cut into V = W * A interleaved shares, share v taking positions v, v + V, v + 2V, ... (torch's
   `DistributedSampler` layout over V replicas). Rank r owns shares r, r + W, ..., r + (A-1)W and
   reads them batch by batch in turn: micro-batch a of each optimizer step comes from share a*W + r.
   With A = 1 this is DistributedSampler's layout. With repeats, the R copies of a sample sit in
   consecutive positions and so go to R different shares, i.e. R different micro-batches (ranks, or
   accumulation steps of one rank) when V >= R: timm's RepeatAugSampler puts them on different
   processes, and accumulation plays the part of the missing processes. Unlike timm's sampler,
   world_size=1 is allowed;
4. every share keeps the same number of samples: `ceil(N / V)` with `pad=True` (the list is extended
   by wrapping around, so every sample is read at least once and a few twice, as in
   `DistributedSampler`), `floor(N / V)` with `pad=False` (up to V-1 samples are skipped that epoch).
   With repeats the epoch length stays that of the dataset (the first N/V of the repeated list per
   share, so about N/R distinct samples per epoch, each R times);
5. batches: `drop_last=True` keeps whole batches only, so every rank runs the same number of steps
   (with A > 1, a multiple of A: every optimizer step gets its A micro-batches).

Each planned position is a *tagged index*: sample index (low 40 bits), copy number (8 bits: which
repeat, or which wrap-around pad) and epoch (15 bits, modulo 2**15). Backends decode sample =
tag & SAMPLE_MASK; the crop, flip and interpolation of that read are a pure function of (seed, tag),
computed by `read_box` from a counter-based hash (no RNG state), so they do not depend on which
thread or worker process decodes the image, and the FFCV, DALI and PIL backends draw the same boxes:
PIL calls `CropSpec.read`, FFCV's decoder and DALI's windows call `read_box` compiled by numba. A
fresh loader at epoch e therefore gives the very reads of one that has run epochs 0..e-1: `--resume`
is exact on every backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

SAMPLE_BITS = 40
COPY_BITS = 8
EPOCH_BITS = 15
SAMPLE_MASK = (1 << SAMPLE_BITS) - 1
COPY_MASK = (1 << COPY_BITS) - 1
EPOCH_MASK = (1 << EPOCH_BITS) - 1
_M32 = 0xFFFFFFFF


def tag(sample, copy, epoch) -> np.ndarray:
    """Pack sample index, copy number and epoch into one int64 per read."""
    sample = np.asarray(sample, dtype=np.int64)
    copy = np.minimum(np.asarray(copy, dtype=np.int64), COPY_MASK)
    return sample | (copy << SAMPLE_BITS) | ((int(epoch) & EPOCH_MASK) << (SAMPLE_BITS + COPY_BITS))


def untag(tagged) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(tagged, dtype=np.int64)
    return t & SAMPLE_MASK, (t >> SAMPLE_BITS) & COPY_MASK, (t >> (SAMPLE_BITS + COPY_BITS)) & EPOCH_MASK


@dataclass(frozen=True)
class IndexPlan:
    """The reads of one rank, epoch by epoch. See the module docstring for the order."""

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    aug_repeats: int = 0  # 0 or 1: off; R >= 2: each sample R times per epoch
    drop_last: bool = True
    pad: bool = True
    accum_steps: int = 1  # micro-batches per optimizer step on each rank (module docstring, 3.)

    def __post_init__(self):
        from fastrsb.errors import FastRSBError

        if self.num_samples < 1:
            raise FastRSBError("the split holds no samples; check the dataset path and split name")
        if self.batch_size < 1:
            raise FastRSBError(f"batch_size must be positive, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise FastRSBError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if isinstance(self.accum_steps, bool) or not isinstance(self.accum_steps, int) or self.accum_steps < 1:
            raise FastRSBError(f"accum_steps must be a positive integer, got {self.accum_steps!r}")
        if self.accum_steps > 1 and not self.drop_last:
            raise FastRSBError("accum_steps > 1 needs whole micro-batches: pass drop_last=True (or accum_steps=1)")
        if self.aug_repeats < 0 or self.aug_repeats > COPY_MASK:
            raise FastRSBError(f"aug_repeats must be in [0, {COPY_MASK}], got {self.aug_repeats}")
        if self.num_samples > SAMPLE_MASK:
            raise FastRSBError(f"more than 2**{SAMPLE_BITS} samples are not supported")
        if self.batches_per_epoch < 1:
            raise FastRSBError(
                f"batch_size {self.batch_size} is larger than the {self.samples_per_share} samples each of the "
                f"{self.shares} micro-shards (world_size {self.world_size} x accum_steps {self.accum_steps}) reads "
                "per epoch and drop_last=True: lower batch_size or accum_steps, or pass drop_last=False")

    @property
    def repeats(self) -> int:
        return max(1, self.aug_repeats)

    @property
    def shares(self) -> int:
        """V = world_size * accum_steps: the micro-shards the epoch is cut into."""
        return self.world_size * self.accum_steps

    @property
    def samples_per_share(self) -> int:
        """Samples one micro-shard reads per epoch, before dropping the last partial batch."""
        n, v = self.num_samples, self.shares
        return math.ceil(n / v) if self.pad else n // v

    @property
    def batches_per_share(self) -> int:
        per = self.samples_per_share
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch (a multiple of accum_steps)."""
        return self.batches_per_share * self.accum_steps

    @property
    def reads_per_epoch(self) -> int:
        """Samples this rank yields per epoch (after drop_last)."""
        return min(self.samples_per_share, self.batches_per_share * self.batch_size) * self.accum_steps

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64([self.seed & 0xFFFFFFFFFFFF, int(epoch)]))
        return rng.permutation(self.num_samples).astype(np.int64)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, copy numbers) this rank reads in `epoch`, in order."""
        order = self.permutation(epoch)
        r = self.repeats
        samples = np.repeat(order, r)
        copies = np.tile(np.arange(r, dtype=np.int64), self.num_samples)
        v = self.shares
        total = self.samples_per_share * v
        if total > samples.size:  # wrap-around padding; the copy number marks the wrap
            wraps = np.arange(total, dtype=np.int64) // samples.size
            samples = np.resize(samples, total)
            copies = np.resize(copies, total) + r * wraps
        keep = min(self.samples_per_share, self.batches_per_share * self.batch_size)
        if self.accum_steps == 1:
            mine = slice(self.rank, total, v)
            return samples[mine][:keep], copies[mine][:keep]
        # this rank's shares, one row per accumulation step: share a*W + rank; read micro-batch by
        # micro-batch in turn (whole batches: accum_steps > 1 requires drop_last), step k taking
        # batch k of shares a = 0, 1, ..., A-1
        rows = [slice(a * self.world_size + self.rank, total, v) for a in range(self.accum_steps)]
        b = self.batch_size
        shape = (self.accum_steps, keep // b, b)
        mine_s = np.stack([samples[row][:keep] for row in rows]).reshape(shape)
        mine_c = np.stack([copies[row][:keep] for row in rows]).reshape(shape)
        return mine_s.transpose(1, 0, 2).reshape(-1), mine_c.transpose(1, 0, 2).reshape(-1)

    def tagged(self, epoch: int) -> np.ndarray:
        samples, copies = self.epoch(epoch)
        return tag(samples, copies, epoch)

    def batches(self, epoch: int) -> list[np.ndarray]:
        t = self.tagged(epoch)
        return [t[i:i + self.batch_size] for i in range(0, t.size, self.batch_size)]


# ---------------------------------------------------------------------------------------------
# Seeded per-read randomness. Plain integer and float code that runs both in Python (PIL backend)
# and compiled by numba (FFCV backend) with the same results: products of two 32-bit values are
# masked to their low 32 bits, which are the same whether the product wrapped in int64 or not.

def _build(jit):
    """The same code, plain (jit = identity) or numba-compiled (jit = numba.njit)."""

    @jit
    def _mix32(x):
        # "lowbias32" integer hash (C. Wellons, hash-prospector).
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        return x

    @jit
    def read_key(seed, tagged):
        """A 32-bit key for one read (seed, sample, copy, epoch)."""
        h = _mix32((seed & 0xFFFFFFFF) ^ 0x5BD1E995)
        h = _mix32(h ^ (tagged & 0xFFFFFFFF))
        h = _mix32(h ^ ((tagged >> 32) & 0xFFFFFFFF))
        return h

    @jit
    def uniform(key, counter):
        """The counter-th uniform draw in [0, 1) of a read."""
        return _mix32(key ^ _mix32((counter * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF)) / 4294967296.0

    @jit
    def random_resized_crop(height, width, key, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_p):
        """torchvision's RandomResizedCrop.get_params, drawn from `uniform(key, ...)`.

        Returns (top, left, crop_height, crop_width, flip); flip is 1 with probability flip_p.
        """
        area = height * width
        for attempt in range(10):
            target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * attempt))
            aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, 4 * attempt + 1))
            w = int(math.floor(math.sqrt(target_area * aspect) + 0.5))
            h = int(math.floor(math.sqrt(target_area / aspect) + 0.5))
            if 0 < w <= width and 0 < h <= height:
                top = int(uniform(key, 4 * attempt + 2) * (height - h + 1))
                left = int(uniform(key, 4 * attempt + 3) * (width - w + 1))
                return top, left, h, w, int(uniform(key, 99) < flip_p)
        # Fallback: central crop at the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < math.exp(log_ratio_lo):
            w = width
            h = int(math.floor(w / math.exp(log_ratio_lo) + 0.5))
        elif in_ratio > math.exp(log_ratio_hi):
            h = height
            w = int(math.floor(h * math.exp(log_ratio_hi) + 0.5))
        else:
            w = width
            h = height
        return (height - h) // 2, (width - w) // 2, h, w, int(uniform(key, 99) < flip_p)

    @jit
    def use_bicubic(key, mode):
        """1 for bicubic, 0 for bilinear; mode RANDOM draws one of the two with p=1/2 (timm's 'random')."""
        if mode == 2:  # RANDOM
            return int(uniform(key, 98) < 0.5)
        return int(mode == 1)  # BICUBIC

    @jit
    def center_crop_box(height, width, res, crop_pct):
        """(top, left, box_height, box_width) in source pixels, fractional: the box timm's eval transform reads.

        timm's `transforms_imagenet_eval` (crop_mode "center"): torchvision's Resize(floor(res / crop_pct)) on
        the short side (long side int(size * long / short); an image of that size already is not resized, and
        a box at scale 1 is copied exactly by PIL's filters), then CenterCrop(res) at offsets
        int(round((side - res) / 2)) (round half to even, Python's and numba's round). PIL's `Image.resize(box=...)` of the
        source box that maps onto that crop gives the pixels of resize-then-crop: the same filter centres,
        support and taps (clipped to the image, not to the box)."""
        size = math.floor(res / crop_pct)
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_h, new_w = size, int(size * width / height)
        top = int(round((new_h - res) / 2.0))
        left = int(round((new_w - res) / 2.0))
        scale_y, scale_x = height / new_h, width / new_w
        return top * scale_y, left * scale_x, res * scale_y, res * scale_x

    @jit
    def read_box(height, width, tagged, res, seed, train, crop_pct, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi,
                 flip_p, mode):
        """(top, left, box_height, box_width, flip, bicubic) of one read resized to res x res: every backend's
        boxes come from here. The box is in source pixels, as floats (whole numbers in train).

        Train: `random_resized_crop` and `use_bicubic`. Eval: `center_crop_box`, timm's eval geometry (resize
        the short side to floor(res / crop_pct), centre crop res x res), never flipped, bicubic. The
        arguments after (height, width, tagged, res) are `CropSpec.box_args`."""
        key = read_key(seed, tagged)
        if train:
            top, left, h, w, flip = random_resized_crop(height, width, key, scale_lo, scale_hi, log_ratio_lo,
                                                        log_ratio_hi, flip_p)
            return float(top), float(left), float(h), float(w), flip, use_bicubic(key, mode)
        top_f, left_f, h_f, w_f = center_crop_box(height, width, res, crop_pct)
        return top_f, left_f, h_f, w_f, 0, use_bicubic(key, mode)

    return SimpleNamespace(read_key=read_key, uniform=uniform, random_resized_crop=random_resized_crop,
                           use_bicubic=use_bicubic, center_crop_box=center_crop_box, read_box=read_box)


BILINEAR, BICUBIC, RANDOM = 0, 1, 2
INTERPOLATIONS = {"bilinear": BILINEAR, "bicubic": BICUBIC, "random": RANDOM}
_PLAIN = _build(lambda f: f)
read_key, uniform, random_resized_crop, use_bicubic, center_crop_box, read_box = (
    _PLAIN.read_key, _PLAIN.uniform, _PLAIN.random_resized_crop, _PLAIN.use_bicubic, _PLAIN.center_crop_box,
    _PLAIN.read_box)
_NUMBA = None


def numba_functions() -> SimpleNamespace:
    """read_key, uniform, random_resized_crop, use_bicubic, center_crop_box and read_box compiled by numba,
    for FFCV's JIT pipeline and DALI's per-batch windows."""
    global _NUMBA
    if _NUMBA is None:
        import numba

        _NUMBA = _build(numba.njit(cache=False))
    return _NUMBA


@dataclass(frozen=True)
class CropSpec:
    """What a backend does to each read: train (seeded random-resized-crop + flip) or eval (centre window).

    The one description of crops, flips and resize filters all backends follow: boxes, flips and the
    filter are a pure function of (seed, tagged read) through `read_box` (`read`), so every backend
    reads the same boxes and resizes each with the same filter. interpolation
    (train only): "bilinear", "bicubic" or "random" (one of the two per read with p=1/2, timm's
    `random` interpolation of `transforms_imagenet_train`); eval always resizes bicubic (timm's eval).
    Every backend resizes antialiased (the filter support widens with the downscale factor, as PIL's).
    """

    train: bool
    seed: int
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability of a horizontal flip (train only)
    interpolation: str = "random"  # train resize filter: bilinear | bicubic | random (eval: bicubic)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            from fastrsb.errors import FastRSBError

            raise FastRSBError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                               f"got {self.interpolation!r}")

    @property
    def crop_first(self) -> bool:
        """Whether the box is cut out before it is resized, so the filter reads only pixels inside it.

        Train: yes, as timm's RandomResizedCropAndInterpolation (torchvision's `F.resized_crop`: crop, then
        resize the crop). Eval: no, as timm's eval transform (resize the whole image, then crop): the
        filter's taps around the box edges read the pixels beyond them (clipped to the image), which PIL's
        `Image.resize(box=...)` does. Every backend follows this flag."""
        return self.train

    @property
    def mode(self) -> int:
        """The filter as an int for compiled code: BILINEAR, BICUBIC or RANDOM (eval: always BICUBIC)."""
        return INTERPOLATIONS[self.interpolation] if self.train else BICUBIC

    @property
    def box_args(self) -> tuple:
        """The arguments of `read_box` after (height, width, tagged, res), for compiled callers."""
        return (int(self.seed), bool(self.train), float(self.crop_pct), float(self.scale[0]), float(self.scale[1]),
                math.log(self.ratio[0]), math.log(self.ratio[1]), float(self.hflip), self.mode)

    def read(self, height: int, width: int, tagged: int, res: int) -> tuple[float, float, float, float, int, int]:
        """(top, left, box_height, box_width, flip, bicubic) of one read of an image of this size, resized to
        res x res (the box in source pixels; eval boxes are fractional)."""
        return read_box(int(height), int(width), int(tagged), int(res), *self.box_args)

    def bicubic(self, tagged: int) -> bool:
        """Whether this read is resized bicubic (else bilinear)."""
        return bool(use_bicubic(read_key(self.seed, int(tagged)), self.mode))
