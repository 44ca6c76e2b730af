"""Batched, per-sample training augmentation on any device: flip, RandAugment, mixup/cutmix, normalise.

Follows timm 1.0 (`timm/data/auto_augment.py`, `timm/data/mixup.py`, Ross Wightman) for semantics and
the papers for provenance:
  RandAugment, Cubuk et al., arXiv 1909.13719 (timm's variant: per-op probability, magnitude noise,
  the "increasing" op set); mixup, Zhang et al., arXiv 1710.09412; CutMix, Yun et al., arXiv 1905.04899.

timm runs RandAugment image by image with PIL on the CPU. Here every image of a batch still draws its
own ops, application coins, magnitudes and signs, but the work is done per op over the subset of images
that drew it (one index_select / compute / index_copy_ per op and layer), with all geometric ops of a
layer fused into one batched gather warp (`_warp`). All random decisions are taken on the host with
numpy (seeded from the optional `torch.Generator`), and every host value reaches the device through a
pinned, non-blocking copy (`_to_device`), so a call is meant to need no device-to-host synchronisation
when given a CPU generator (or none); tests/test_gpu_aug.py checks that with CUDA's sync debug mode
where a GPU is present (not yet run: no GPU so far).

Each op reproduces timm's PIL op on uint8 images, including PIL's integer rounding (grayscale
conversion, truncating blends, equalize's LUT, affine transforms that sample pixel centres and fill
outside the source image); tests/test_gpu_aug.py holds the per-op tolerances against timm.
Differences from timm, by choice:
  * geometric ops use one interpolation for all images (bilinear by default). timm's RandAugment picks
    bilinear or bicubic at random per application unless its hparams fix `interpolation`.
  * fill defaults to 128 grey. timm's `create_transform` passes the ImageNet mean rounded to uint8,
    (124, 116, 104), as `img_mean`; pass `fill=(124, 116, 104)` to match that pipeline.
  * uint8 in, uint8 out for RandAugment (PIL works on 8-bit images too); mixup/cutmix return float
    images because a mixed pixel is not an integer.

Measured with `fastrsb bench aug --quick` (benchmarks/results/cpu-2core-2026-11-26.jsonl: 2-core AMD
EPYC, torch 2.14.1, timm 1.0.31; batch 256 uint8 at 160 px, rand-m6-mstd0.5-inc1): fastrsb RandAugment
673 img/s, RA + mixup/cutmix + bf16 normalise 417 img/s, against timm's PIL RandAugment 1,399 img/s on
one core and torchvision v2 RandAugment 952 (batch-wise) / 841 (per image) img/s. On a CPU, PIL's
per-image C code wins; this module is meant for the GPU, where its ops are issued without any sync.
Not yet measured on a GPU (none was available): the H100 target is <= 5 ms for RA + mixup/cutmix +
normalise on 256 images at 160 px.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .loss import smooth_one_hot

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_LEVEL_DENOM = 10.0  # timm's magnitude scale: 0..10

RAND_OPS = (  # timm's _RAND_TRANSFORMS (inc0)
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (  # timm's _RAND_INCREASING_TRANSFORMS (inc1), the RSB set
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

RAND_AUGMENT_GRAMMAR = (
    "rand[-m<magnitude>][-n<ops per image>][-mstd<magnitude std>][-mmax<magnitude max>]"
    "[-p<op probability>][-inc<0|1>], e.g. 'rand-m6-mstd0.5-inc1' (timm's grammar; the 't' transform-set "
    "token is not supported)"
)


# ----------------------------------------------------------------------------------------------
# Checks and host-side randomness
# ----------------------------------------------------------------------------------------------

def _check_images(images: torch.Tensor, who: str, uint8: bool) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{who}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{who}: images must be a 4-d NCHW batch, got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(
            f"{who}: images must be NCHW with 3 (RGB) channels, got shape {tuple(images.shape)}; "
            "an NHWC tensor must be permuted to NCHW (channels_last memory format is fine)")
    if uint8 and images.dtype != torch.uint8:
        raise TypeError(
            f"{who}: images must be uint8 (0..255, like the 8-bit PIL images timm augments), got "
            f"{images.dtype}; augment before normalising")
    if not uint8 and images.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32,
                                          torch.float64):
        raise TypeError(f"{who}: images must be uint8 or floating point, got {images.dtype}")


def _host_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy generator seeded from `generator` (or torch's default CPU generator).

    The seed is drawn on the generator's device: a CUDA generator costs one device-to-host sync here.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
    return np.random.default_rng(int(seed.item()))  # sync only when the generator lives on a GPU


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to `device` without waiting for the device (pinned, asynchronous copy on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# RandAugment ops on uint8 (b, 3, H, W) with a per-sample magnitude (b,) on timm's 0..10 scale
# ----------------------------------------------------------------------------------------------

def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _blend_to_uint8(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor) for 8-bit images: clamp, then truncate."""
    out = torch.lerp(degenerate.float(), x.float(), _col(factor).float().expand_as(x))
    return out.clamp_(0, 255).to(torch.uint8)


def _grayscale_pil(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded), as int32."""
    xi = x.to(torch.int32)
    return (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-(image, channel) lookup: lut is (b, 3, 256) integer."""
    b, c, h, w = x.shape
    base = torch.arange(b * c, device=x.device).view(b, c, 1, 1) * 256
    return torch.take(lut.reshape(-1).to(torch.uint8), x.long() + base)


def _auto_contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3)).double()  # (b, 3)
    hi = x.amax(dim=(2, 3)).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    offset = -lo * scale
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    # float64 and truncation, as ImageOps.autocontrast builds its LUT in Python floats
    lut = torch.trunc(levels * scale[..., None] + offset[..., None]).clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, levels)
    return _apply_lut(x, lut)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))  # scatter, not bincount: bincount syncs on CUDA
    top = flat.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255  # ImageOps.equalize: (total - count of top value) // 255
    distinct = (hist > 0).sum(dim=1, keepdim=True)
    before = torch.cumsum(hist, dim=1) - hist
    lut = (step // 2 + before) // step.clamp(min=1)
    levels = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where((step > 0) & (distinct > 1), lut.clamp(max=255), levels)
    return _apply_lut(x, lut.view(b, c, 256))


def _invert(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return 255 - x


def _posterize_bits(bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bits = bits.clamp(0, 8).to(torch.int32)
    mask = (0xFF << (8 - bits)) & 0xFF  # keep the `bits` most significant bits
    return x & _col(mask).to(torch.uint8)


def _posterize(x, m):  # timm 'Posterize': keep int(m / 10 * 4) bits (0 bits at m < 2.5)
    return _posterize_bits(torch.trunc(m.abs() / _LEVEL_DENOM * 4), x)


def _posterize_increasing(x, m):  # keep 4 - int(m / 10 * 4) bits
    return _posterize_bits(4 - torch.trunc(m.abs() / _LEVEL_DENOM * 4), x)


def _solarize_thresh(thresh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = _col(thresh).to(torch.int16)
    return torch.where(x.to(torch.int16) < t, x, 255 - x)


def _solarize(x, m):  # threshold min(256, int(m / 10 * 256)): weaker with magnitude
    return _solarize_thresh(torch.trunc(m.abs() / _LEVEL_DENOM * 256).clamp(max=256), x)


def _solarize_increasing(x, m):  # threshold 256 - min(256, int(m / 10 * 256))
    return _solarize_thresh(256 - torch.trunc(m.abs() / _LEVEL_DENOM * 256).clamp(max=256), x)


def _solarize_add(x, m):  # add min(128, int(m / 10 * 110)) to pixels below 128, saturating
    add = _col(torch.trunc(m.abs() / _LEVEL_DENOM * 110).clamp(max=128)).to(torch.int16)
    xi = x.to(torch.int16)
    return torch.where(xi < 128, (xi + add).clamp(max=255), xi).to(torch.uint8)


def _enhance_factor(m: torch.Tensor) -> torch.Tensor:  # 'Color' etc.: [0.1, 1.9], unsigned
    return m.abs() / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_factor(m: torch.Tensor) -> torch.Tensor:  # 1 +- 0.9 m / 10, at least 0.1
    return (1.0 + m / _LEVEL_DENOM * 0.9).clamp(min=0.1)


def _color(x, factor):
    return _blend_to_uint8(_grayscale_pil(x), x, factor)


def _contrast(x, factor):
    gray_mean = _grayscale_pil(x).double().mean(dim=(1, 2, 3))
    return _blend_to_uint8(_col(torch.floor(gray_mean + 0.5)), x, factor)  # PIL: int(mean + 0.5)


def _brightness(x, factor):
    return _blend_to_uint8(torch.zeros((), device=x.device), x, factor)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # ImageFilter.SMOOTH


def _sharpness(x, factor):
    b, c, h, w = x.shape
    degenerate = x.clone()
    if h > 2 and w > 2:  # PIL's 3x3 filter leaves the one-pixel border as it was
        kernel = _to_device(_SMOOTH.numpy(), x.device).expand(c, 1, 3, 3)
        smooth = F.conv2d(x.float(), kernel, groups=c)
        degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5).clamp_(0, 255).to(torch.uint8)
    return _blend_to_uint8(degenerate, x, factor)


def _enhance(fn, factor_fn):
    return lambda x, m: fn(x, factor_fn(m))


# Geometric ops: per-sample affine maps in PIL's convention, source = A @ (x, y, 1), with pixel
# centres at half-integers and the origin at the image's top-left corner.

def _rotate_matrix(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    angle = -torch.deg2rad(m / _LEVEL_DENOM * 30.0)  # Image.rotate: counter-clockwise about the centre
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    row0 = torch.stack([cos, sin, cx - cos * cx - sin * cy], dim=-1)
    row1 = torch.stack([-sin, cos, cy + sin * cx - cos * cy], dim=-1)
    return torch.stack([row0, row1], dim=1)


def _affine(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], dim=1)


def _shear_x_matrix(m, h, w):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(one, m / _LEVEL_DENOM * 0.3, zero, zero, one, zero)


def _shear_y_matrix(m, h, w):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(one, zero, zero, m / _LEVEL_DENOM * 0.3, one, zero)


def _translate_x_rel_matrix(m, h, w, pct=0.45):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(one, zero, m / _LEVEL_DENOM * pct * w, zero, one, zero)


def _translate_y_rel_matrix(m, h, w, pct=0.45):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(one, zero, zero, zero, one, m / _LEVEL_DENOM * pct * h)


def _warp(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's Image.transform(AFFINE) for a batch with one matrix per image.

    PIL maps each output pixel centre to a source point in double precision, fills the pixel when
    that point lies outside the image, and otherwise interpolates between edge-clamped neighbours
    and truncates. We do the same: float64 coordinates, one gather of the four neighbours from an
    edge-padded copy, float32 interpolation. (grid_sample was the first choice, but its float32
    normalised coordinates put exact pixel centres a hair off, and truncation turns that into
    off-by-one pixels even for the identity.) The result is channels_last in memory.
    """
    b, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64),
                            torch.arange(w, device=x.device, dtype=torch.float64), indexing="ij")
    centres = torch.stack([xs + 0.5, ys + 0.5, torch.ones_like(xs)], dim=-1).view(1, h * w, 3)
    src = torch.matmul(centres, mats.to(torch.float64).transpose(1, 2)) - 0.5  # (b, h*w, 2), pixel index units
    inside = ((src >= -0.5).all(dim=-1) & (src[..., 0] < w - 0.5) & (src[..., 1] < h - 0.5)).view(b, h, w, 1)
    # gather uint8 pixels (a quarter of the bytes of float), interpolate in float32
    padded = F.pad(x.contiguous(memory_format=torch.channels_last), (1, 1, 1, 1), mode="replicate")
    rows = padded.permute(0, 2, 3, 1).reshape(-1, c)  # (b * (h+2) * (w+2), c), a view
    corner = src.floor() if interpolation == "bilinear" else (src + 0.5).floor()
    # index into the padded image; clamped only to stay in memory for points that get the fill
    ix = corner[..., 0].clamp(-1, w - 1).long() + 1
    iy = corner[..., 1].clamp(-1, h - 1).long() + 1
    base = (torch.arange(b, device=x.device).view(b, 1) * (h + 2) + iy) * (w + 2) + ix
    fill_hwc = fill.view(1, 1, 1, c)
    if interpolation == "nearest":
        out = rows.index_select(0, base.view(-1)).view(b, h, w, c).float()
    else:
        offsets = _to_device(np.array([0, 1, w + 2, w + 3], dtype=np.int64), x.device).view(4, 1, 1)
        v00, v01, v10, v11 = rows.index_select(0, (base + offsets).view(-1)).view(4, b, h, w, c).float().unbind(0)
        weight = (src - corner).float().view(b, h, w, 2, 1).unbind(3)
        out = torch.lerp(torch.lerp(v00, v01, weight[0]), torch.lerp(v10, v11, weight[0]), weight[1])
    out = torch.where(inside, out, fill_hwc)
    return out.clamp_(0, 255).to(torch.uint8).permute(0, 3, 1, 2)  # truncates, as PIL does


@dataclass(frozen=True)
class _Op:
    fn: Callable  # (uint8 images, signed magnitudes) -> uint8 images, or -> affine matrices
    signed: bool  # RandAugment gives this op a random sign
    geometric: bool = False


_OPS: dict[str, _Op] = {
    "AutoContrast": _Op(_auto_contrast, False),
    "Equalize": _Op(_equalize, False),
    "Invert": _Op(_invert, False),
    "Posterize": _Op(_posterize, False),
    "PosterizeIncreasing": _Op(_posterize_increasing, False),
    "Solarize": _Op(_solarize, False),
    "SolarizeIncreasing": _Op(_solarize_increasing, False),
    "SolarizeAdd": _Op(_solarize_add, False),
    "Color": _Op(_enhance(_color, _enhance_factor), False),
    "ColorIncreasing": _Op(_enhance(_color, _enhance_increasing_factor), True),
    "Contrast": _Op(_enhance(_contrast, _enhance_factor), False),
    "ContrastIncreasing": _Op(_enhance(_contrast, _enhance_increasing_factor), True),
    "Brightness": _Op(_enhance(_brightness, _enhance_factor), False),
    "BrightnessIncreasing": _Op(_enhance(_brightness, _enhance_increasing_factor), True),
    "Sharpness": _Op(_enhance(_sharpness, _enhance_factor), False),
    "SharpnessIncreasing": _Op(_enhance(_sharpness, _enhance_increasing_factor), True),
    "Rotate": _Op(_rotate_matrix, True, geometric=True),
    "ShearX": _Op(_shear_x_matrix, True, geometric=True),
    "ShearY": _Op(_shear_y_matrix, True, geometric=True),
    "TranslateXRel": _Op(_translate_x_rel_matrix, True, geometric=True),
    "TranslateYRel": _Op(_translate_y_rel_matrix, True, geometric=True),
}
OP_NAMES = tuple(_OPS)
SIGNED_OPS = tuple(name for name, op in _OPS.items() if op.signed)
_INTERPOLATIONS = ("bilinear", "nearest")


def _lookup_op(name: str) -> _Op:
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; valid ops: {', '.join(OP_NAMES)}")
    return _OPS[name]


def _fill_tensor(fill: int | Sequence[int], device: torch.device) -> torch.Tensor:
    values = [float(fill)] * 3 if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"fill must be one value or 3 values in 0..255, got {fill!r}")
    return _to_device(np.array(values, dtype=np.float32), device).view(1, 3, 1, 1)


def _geometric_matrices(name: str, m: torch.Tensor, h: int, w: int, translate_pct: float) -> torch.Tensor:
    op = _OPS[name]
    if name in ("TranslateXRel", "TranslateYRel"):
        return op.fn(m, h, w, translate_pct)
    return op.fn(m, h, w)


def apply_op(name: str, images: torch.Tensor, magnitudes, *, fill: int | Sequence[int] = 128,
             interpolation: str = "bilinear", translate_pct: float = 0.45) -> torch.Tensor:
    """Apply one RandAugment op to every image of a uint8 NCHW batch, each at its own magnitude.

    `magnitudes`: a number or a (batch,) tensor on timm's 0..10 scale, already signed: for the ops in
    SIGNED_OPS a negative magnitude is what timm's `_randomly_negate` gives when it flips the sign
    (negative angle, shear, translation, or enhancement factor below 1 for the *Increasing ops).
    Unsigned ops use the absolute value. No clamping happens here: RandAugment clamps before the sign.
    """
    _check_images(images, "apply_op", uint8=True)
    op = _lookup_op(name)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    m = torch.as_tensor(magnitudes, dtype=torch.float64, device=images.device)
    m = m.expand(images.shape[0]) if m.ndim == 0 else m
    if m.shape != (images.shape[0],):
        raise ValueError(f"magnitudes must be a number or shaped ({images.shape[0]},), got {tuple(m.shape)}")
    if images.shape[0] == 0:
        return images.clone()
    fmt = _memory_format(images)
    if op.geometric:
        h, w = images.shape[-2:]
        mats = _geometric_matrices(name, m, h, w, translate_pct)
        out = _warp(images, mats, _fill_tensor(fill, images.device), interpolation)
    else:
        out = op.fn(images, m)
    return out.contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------

class RandAugment:
    """timm's RandAugment, batched: each image draws `num_ops` ops with replacement, each applied with
    probability `prob` at magnitude N(magnitude, magnitude_std) clamped to [0, magnitude_max], with a
    random sign for signed ops. magnitude_std=inf samples uniformly in [0, magnitude], as timm does.
    """

    def __init__(self, ops: Sequence[str] = RAND_INCREASING_OPS, num_ops: int = 2, magnitude: float = 10.0,
                 magnitude_std: float = 0.0, magnitude_max: float = _LEVEL_DENOM, prob: float = 0.5,
                 fill: int | Sequence[int] = 128, interpolation: str = "bilinear", translate_pct: float = 0.45):
        self.ops = tuple(ops)
        for name in self.ops:
            _lookup_op(name)
        if not self.ops:
            raise ValueError("RandAugment needs at least one op")
        if num_ops < 0 or int(num_ops) != num_ops:
            raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if magnitude < 0 or magnitude_std < 0 or magnitude_max <= 0:
            raise ValueError("magnitude and magnitude_std must be >= 0 and magnitude_max > 0, got "
                             f"{magnitude!r}, {magnitude_std!r}, {magnitude_max!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        _fill_tensor(fill, torch.device("cpu"))
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.magnitude_max = float(magnitude_max)
        self.prob = float(prob)
        self.fill = fill
        self.interpolation = interpolation
        self.translate_pct = float(translate_pct)
        self._signed = np.array([_OPS[name].signed for name in self.ops])
        self._geometric = np.array([_OPS[name].geometric for name in self.ops])

    @classmethod
    def from_timm(cls, config: str, **kwargs) -> "RandAugment":
        """Parse timm's string, e.g. 'rand-m6-mstd0.5-inc1' (RSB A3) or 'rand-m7-mstd0.5-inc1' (A1/A2).

        Defaults as in timm's rand_augment_transform: m10, n2, p0.5, mstd0, mmax10, inc0; mstd above
        100 means uniform magnitudes. `kwargs` (fill, interpolation, translate_pct) go to __init__.
        """
        if not isinstance(config, str):
            raise ValueError(f"RandAugment config must be a string in the grammar {RAND_AUGMENT_GRAMMAR}")
        tokens = config.split("-")
        if tokens[0] != "rand":
            raise ValueError(f"RandAugment config {config!r} must start with 'rand'; grammar: {RAND_AUGMENT_GRAMMAR}")
        params = dict(magnitude=_LEVEL_DENOM, num_ops=2, prob=0.5, magnitude_std=0.0, magnitude_max=_LEVEL_DENOM)
        increasing = False
        keys = {"m": "magnitude", "n": "num_ops", "p": "prob", "mstd": "magnitude_std", "mmax": "magnitude_max"}
        for token in tokens[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?|\.\d+)", token)
            if match is None:
                raise ValueError(f"bad RandAugment token {token!r} in {config!r}; grammar: {RAND_AUGMENT_GRAMMAR}")
            key, value = match.group(1), float(match.group(2))
            if key == "inc":
                if value not in (0.0, 1.0):
                    raise ValueError(f"bad RandAugment token {token!r}: inc takes 0 or 1; grammar: {RAND_AUGMENT_GRAMMAR}")
                increasing = bool(value)
            elif key == "n":
                if value != int(value):
                    raise ValueError(f"bad RandAugment token {token!r}: n takes an integer; grammar: {RAND_AUGMENT_GRAMMAR}")
                params["num_ops"] = int(value)
            elif key == "p" and value > 1:
                raise ValueError(f"bad RandAugment token {token!r}: p is a probability; grammar: {RAND_AUGMENT_GRAMMAR}")
            elif key == "mstd":
                params["magnitude_std"] = math.inf if value > 100 else value  # timm: > 100 means uniform
            elif key == "mmax":
                params["magnitude_max"] = value if value > 0 else _LEVEL_DENOM  # timm: `mmax or 10`
            else:
                params[keys[key]] = value
        ops = RAND_INCREASING_OPS if increasing else RAND_OPS
        return cls(ops=ops, **params, **kwargs)

    def __repr__(self) -> str:
        return (f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, "
                f"mmax={self.magnitude_max}, p={self.prob}, ops={list(self.ops)})")

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None,
                      rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Draw every image's ops on the host. Returns (batch_size, num_ops) arrays:
        op_index (into self.ops), applied (bool), magnitude (clamped, signed for signed ops; 0 where not
        applied), negated (bool, the random sign; False for unsigned ops)."""
        rng = rng if rng is not None else _host_rng(generator)
        shape = (batch_size, self.num_ops)
        op_index = rng.integers(0, len(self.ops), size=shape)
        applied = rng.random(shape) < self.prob
        if math.isinf(self.magnitude_std):
            magnitude = rng.uniform(0.0, self.magnitude, size=shape)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(self.magnitude, self.magnitude_std, size=shape)
        else:
            magnitude = np.full(shape, self.magnitude)
        magnitude = np.clip(magnitude, 0.0, self.magnitude_max)
        negated = (rng.random(shape) < 0.5) & self._signed[op_index]
        magnitude = np.where(negated, -magnitude, magnitude) * applied
        return dict(op_index=op_index, applied=applied, magnitude=magnitude, negated=negated & applied)

    def apply_params(self, images: torch.Tensor, params: dict[str, np.ndarray]) -> torch.Tensor:
        """Apply drawn params: per layer, per op, on the images that drew it; geometric ops fused."""
        _check_images(images, "RandAugment", uint8=True)
        batch, _, h, w = images.shape
        op_index, applied, magnitude = params["op_index"], params["applied"], params["magnitude"]
        if op_index.shape != (batch, self.num_ops):
            raise ValueError(f"params are for shape {op_index.shape}, images batch is {batch}")
        # Plan on the host: rows of each (layer, op) group, geometric groups of a layer adjacent.
        rows, mags, groups = [], [], []
        start = 0
        order = sorted(range(len(self.ops)), key=lambda k: self._geometric[k])  # geometric ops last
        for layer in range(self.num_ops):
            for k in order:
                sel = np.flatnonzero(applied[:, layer] & (op_index[:, layer] == k))
                if sel.size == 0:
                    continue
                rows.append(sel)
                mags.append(magnitude[sel, layer])
                groups.append((layer, k, start, start + sel.size))
                start += sel.size
        out = images.clone()
        if start == 0:
            return out
        rows_d = _to_device(np.concatenate(rows).astype(np.int64), images.device)
        mags_d = _to_device(np.concatenate(mags).astype(np.float64), images.device)
        fill = _fill_tensor(self.fill, images.device)
        for layer in range(self.num_ops):
            layer_groups = [g for g in groups if g[0] == layer]
            geometric = [g for g in layer_groups if self._geometric[g[1]]]
            for _, k, s, e in layer_groups:
                if self._geometric[k]:
                    continue
                idx = rows_d[s:e]
                out.index_copy_(0, idx, _OPS[self.ops[k]].fn(out.index_select(0, idx), mags_d[s:e]))
            if geometric:  # groups are adjacent: one gather, one warp, one scatter per layer
                s, e = geometric[0][2], geometric[-1][3]
                mats = torch.cat([
                    _geometric_matrices(self.ops[k], mags_d[gs:ge], h, w, self.translate_pct)
                    for _, k, gs, ge in geometric])
                idx = rows_d[s:e]
                out.index_copy_(0, idx, _warp(out.index_select(0, idx), mats, fill, self.interpolation))
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
        _check_images(images, "RandAugment", uint8=True)
        return self.apply_params(images, self.sample_params(images.shape[0], generator, rng))


# ----------------------------------------------------------------------------------------------
# Flip, mixup/cutmix, normalise
# ----------------------------------------------------------------------------------------------

def random_hflip(images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability p (coins drawn on the host)."""
    _check_images(images, "random_hflip", uint8=False)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    rng = rng if rng is not None else _host_rng(generator)
    flip = _to_device(rng.random(images.shape[0]) < p, images.device)
    return torch.where(_col(flip), images.flip(-1), images)


class MixupCutmix:
    """timm's Mixup/CutMix (timm.data.Mixup) on a device batch, with vectorised elem/pair modes.

    λ ~ Beta(α, α) drawn on the host per batch (mode 'batch'), per image ('elem') or per pair i,
    B-1-i ('pair'); with both alphas on, cutmix is chosen with probability switch_prob. The partner
    of image i is image B-1-i (the batch flipped). Cutmix boxes are clipped to the image and, with
    correct_lam, λ becomes 1 - box area / image area. uint8 images come back as float32 0..255.
    """

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1,
                 num_classes: int = 1000, cutmix_minmax: Sequence[float] | None = None, correct_lam: bool = True):
        if mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {mode!r}")
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (min, max), got {cutmix_minmax!r}")
            cutmix_alpha = 1.0  # as timm: minmax boxes switch cutmix on
        if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
            raise ValueError(f"need mixup_alpha > 0 or cutmix_alpha > 0, got {mixup_alpha!r}, {cutmix_alpha!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.correct_lam = bool(correct_lam)

    def _draw_lam(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(lam, use_cutmix) for n draws; lam is 1 where the mix_prob coin says no mixing."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(n) < self.switch_prob
            lam = np.where(use_cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, n),
                           rng.beta(self.mixup_alpha, self.mixup_alpha, n))
        elif self.mixup_alpha > 0:
            use_cutmix = np.zeros(n, dtype=bool)
            lam = rng.beta(self.mixup_alpha, self.mixup_alpha, n)
        else:
            use_cutmix = np.ones(n, dtype=bool)
            lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha, n)
        mixed = rng.random(n) < self.prob
        return np.where(mixed, lam, 1.0), use_cutmix & mixed

    def _boxes(self, rng: np.random.Generator, lam: np.ndarray, h: int, w: int):
        """Clipped cutmix boxes (yl, yh, xl, xh) and the corrected λ, as timm's cutmix_bbox_and_lam."""
        n = lam.shape[0]
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = rng.integers(int(h * lo), int(h * hi), size=n)
            cut_w = rng.integers(int(w * lo), int(w * hi), size=n)
            yl = rng.integers(0, h - cut_h + 1)
            xl = rng.integers(0, w - cut_w + 1)
            yh, xh = yl + cut_h, xl + cut_w
        else:
            ratio = np.sqrt(1.0 - lam)
            cut_h, cut_w = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
            cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
            yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
            xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        return (yl, yh, xl, xh), lam

    def sample_params(self, batch_size: int, height: int, width: int,
                      generator: torch.Generator | None = None, rng: np.random.Generator | None = None) -> dict:
        """Per-image λ (after box correction), cutmix flags and boxes (B, 4: yl, yh, xl, xh; empty
        where not cutmix), all numpy on the host. In 'batch' mode all rows are equal."""
        if batch_size % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size (partner of image i is B-1-i), got {batch_size}")
        rng = rng if rng is not None else _host_rng(generator)
        n = {"batch": 1, "pair": batch_size // 2, "elem": batch_size}[self.mode]
        lam, use_cutmix = self._draw_lam(rng, n)
        boxes = np.zeros((n, 4), dtype=np.int64)
        if use_cutmix.any():
            (yl, yh, xl, xh), lam_cut = self._boxes(rng, lam[use_cutmix], height, width)
            boxes[use_cutmix] = np.stack([yl, yh, xl, xh], axis=1)
            lam = lam.copy()
            lam[use_cutmix] = lam_cut
        if self.mode == "batch":
            lam, use_cutmix, boxes = (np.repeat(a, batch_size, axis=0) for a in (lam, use_cutmix, boxes))
        elif self.mode == "pair":  # image B-1-i shares pair i's λ and box
            lam, use_cutmix, boxes = (np.concatenate([a, a[::-1]]) for a in (lam, use_cutmix, boxes))
        return dict(lam=lam.astype(np.float64), use_cutmix=use_cutmix, boxes=boxes)

    def apply_params(self, images: torch.Tensor, labels: torch.Tensor, params: dict):
        _check_images(images, "MixupCutmix", uint8=False)
        batch, _, h, w = images.shape
        if labels.ndim != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must be shaped ({batch},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        x = images.float() if images.dtype == torch.uint8 else images
        partner = x.flip(0)
        lam_np, cut_np, boxes_np = params["lam"], params["use_cutmix"], params["boxes"]
        if self.mode == "batch":
            # one λ and box for the whole batch: slicing needs no per-pixel weights
            lam = float(lam_np[0])
            if cut_np[0]:
                yl, yh, xl, xh = (int(v) for v in boxes_np[0])
                out = x.clone()
                out[:, :, yl:yh, xl:xh] = partner[:, :, yl:yh, xl:xh]
            elif lam != 1.0:
                out = torch.lerp(partner, x, lam)
            else:
                out = x.clone() if x is images else x
            lam_t: torch.Tensor | float = lam
        else:
            lam_d = _to_device(lam_np.astype(np.float32), images.device)
            cut_d = _to_device(cut_np, images.device)
            box_d = _to_device(boxes_np, images.device)
            ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
            xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
            yl, yh, xl, xh = (_col(box_d[:, i]) for i in range(4))
            in_box = (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)
            keep = torch.where(_col(cut_d), (~in_box).to(x.dtype), _col(lam_d).to(x.dtype))
            out = torch.lerp(partner, x, keep)  # cutmix weight is 0/1 per pixel, mixup weight λ
            lam_t = lam_d.view(-1, 1)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        targets = targets * lam_t + targets.flip(0) * (1.0 - lam_t)
        return out.contiguous(memory_format=_memory_format(images)), targets

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                 rng: np.random.Generator | None = None):
        """-> (mixed images, soft targets float32 (B, num_classes)); raises ValueError on an odd batch."""
        _check_images(images, "MixupCutmix", uint8=False)
        params = self.sample_params(images.shape[0], images.shape[2], images.shape[3], generator, rng)
        return self.apply_params(images, labels, params)


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(images / 255 - mean) / std for uint8 or float images in 0..255; keeps channels_last."""
    _check_images(images, "normalize", uint8=False)
    if not dtype.is_floating_point:
        raise TypeError(f"normalize: dtype must be floating point, got {dtype}")
    mean_t = _to_device(np.asarray(mean, dtype=np.float32), images.device).view(1, -1, 1, 1)
    std_t = _to_device(np.asarray(std, dtype=np.float32), images.device).view(1, -1, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = -mean_t / std_t
    fmt = _memory_format(images)
    out = images.to(torch.float32, copy=True).mul_(scale).add_(shift)
    return out.to(dtype).contiguous(memory_format=fmt)


class TrainAugment:
    """flip -> RandAugment -> mixup/cutmix -> normalise, on a device batch (see make_train_augment)."""

    def __init__(self, rand_augment: RandAugment | None, mixup: MixupCutmix | None, hflip: float,
                 label_smoothing: float, num_classes: int, dtype: torch.dtype,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.rand_augment = rand_augment
        self.mixup = mixup
        self.hflip = hflip
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.dtype = dtype
        self.mean, self.std = mean, std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        _check_images(images, "train augment", uint8=True)
        if self.mixup is not None and images.shape[0] % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {images.shape[0]}")
        rng = _host_rng(generator)  # one seed per call; every draw below is on the host
        x = random_hflip(images, self.hflip, rng=rng) if self.hflip > 0 else images
        if self.rand_augment is not None:
            x = self.rand_augment(x, rng=rng)
        if self.mixup is not None:
            x, targets = self.mixup(x, labels, rng=rng)
        else:
            targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return normalize(x, self.mean, self.std, self.dtype), targets


def make_train_augment(rand_augment: str | None, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float,
                       num_classes: int, hflip: float = 0.5, mixup_prob: float = 1.0, switch_prob: float = 0.5,
                       dtype: torch.dtype = torch.float32, mixup_mode: str = "batch",
                       fill: int | Sequence[int] = 128) -> TrainAugment:
    """The trainer's augmentation: `(images_uint8, labels_int64, generator=None) -> (images, targets)`.

    rand_augment: timm string ('rand-m6-mstd0.5-inc1') or None/'' for none. Mixup/cutmix is off when
    both alphas are 0; targets are then the (smoothed) one-hot labels.
    """
    ra = RandAugment.from_timm(rand_augment, fill=fill) if rand_augment else None
    mix = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        mix = MixupCutmix(mixup_alpha, cutmix_alpha, prob=mixup_prob, switch_prob=switch_prob, mode=mixup_mode,
                          label_smoothing=label_smoothing, num_classes=num_classes)
    return TrainAugment(ra, mix, hflip, label_smoothing, num_classes, dtype)
