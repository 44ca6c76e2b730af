"""RandAugment's image ops on uint8 NCHW batches, one fixed sequence of kernels per layer.

Each op reproduces timm's PIL op (timm 1.0, `timm/data/auto_augment.py`, Ross Wightman) on 8-bit
images, PIL's integer rounding included: grayscale conversion, truncating blends, equalize's LUT,
affine transforms that sample pixel centres, clamp to the edge and fill outside the source image.
tests/test_augment.py holds the per-op tolerances against timm.

How a batch is augmented without data-dependent shapes (so that a call can be compiled or captured):
every image's op for a layer is turned, on the host, into a row of numbers (`COLUMNS`): a LUT choice
and its parameters, a blend choice and its factor, an affine matrix and an interpolation flag, and
the lists of images each costly stage works on. The device then runs the same three stages whatever
the draws:
  1. one per-(image, channel) 256-entry lookup table: identity, invert, posterize, solarize,
     solarize-add (all known on the host), brightness and contrast (blends with a constant, so LUTs
     too), autocontrast and equalize (from histograms of the images that drew them; contrast's
     constant is the grey mean of each image that drew it);
  2. one blend with a degenerate image, for Color (grayscale) and Sharpness (PIL's SMOOTH filter);
  3. one affine warp, bilinear or bicubic per image: 2-d for Rotate, 1-d along the one axis that
     ShearX/Y and TranslateX/Y move pixels along (the same pixels, bit for bit, a quarter of the taps).
Each image goes through at most one non-identity stage per layer. The cheap LUT runs on every image;
the costly parts (the statistics of stage 1, stage 2, stage 3) run only on a fixed number of images,
`cap`, gathered by index and written back. The host, which drew the ops, lists the images; `cap` is
a function of the batch size and the op set that such a list exceeds with probability about 1e-9
(`stage_capacity`); when one does, that call uses the whole batch for that stage (exact either way,
one more compile if compiled). In A3's RandAugment a sixth of the images draw a geometric op in a
layer, and the warp runs on cap = 83 of 256 images, or 447 of 2048.
Pad rows list an image that needs nothing from the stage (its own columns say so): the kernels skip
them, and they are not written back.
The pixel work of each stage is one fused kernel (`kernels`: numba on the CPU, Triton on CUDA), whose
bytes equal those of the torch-op definitions kept here (`warp_reference`, `apply_lut_reference`,
`histogram_reference`, `grey_mean_reference`, `enhance_reference`, `_put_back`).
Only the stages that the op set can need are issued (decided at construction, not per call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels

LEVEL_DENOM = 10.0  # timm's magnitude scale: 0..10
TIMM_FILL = (124, 116, 104)  # timm's create_transform: img_mean, the ImageNet mean as uint8
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")

# One row of per-image parameters per RandAugment layer (float64; integers are exact).
COLUMNS = ("lut", "and_mask", "threshold", "add", "blend", "factor", "geometric", "bicubic",
           "a00", "a01", "a02", "a10", "a11", "a12",
           # which images a costly stage works on (`stage_indices`): rows 0..cap-1 hold an image index each
           "hist_idx", "blend_idx", "warp_idx")
_C = {name: i for i, name in enumerate(COLUMNS)}
NUM_COLUMNS = len(COLUMNS)
LUT_STATIC, LUT_AUTOCONTRAST, LUT_EQUALIZE, LUT_CONTRAST, LUT_BRIGHTNESS = range(5)
BLEND_NONE, BLEND_COLOR, BLEND_SHARPNESS = range(3)
# the "geometric" column: no warp; a map that needs the 2-d warp (Rotate); one that moves pixels along x
# only (the source row is the output row: ShearX, TranslateX); along y only (ShearY, TranslateY)
GEOM_NONE, GEOM_2D, GEOM_X, GEOM_Y = range(4)
_IDENTITY_ROW = np.zeros(NUM_COLUMNS)
_IDENTITY_ROW[[_C["and_mask"], _C["threshold"], _C["factor"], _C["a00"], _C["a11"]]] = (255, 256, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Checks, host randomness, host -> device
# ----------------------------------------------------------------------------------------------

def check_images(images: torch.Tensor, who: str, uint8: bool) -> None:
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


def host_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy generator seeded from `generator` (or torch's default CPU generator).

    The seed is drawn on the generator's device: a CUDA generator costs one device-to-host sync here,
    a CPU generator none.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
    return np.random.default_rng(int(seed.item()))  # sync only when the generator lives on a GPU


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to `device` without waiting for the device (pinned, asynchronous copy on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def memory_format(images: torch.Tensor) -> torch.memory_format:
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def fill_values(fill: int | Sequence[int]) -> tuple[float, float, float]:
    values = [float(fill)] * 3 if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"fill must be one value or 3 values in 0..255, got {fill!r}")
    return tuple(values)


_CONSTANTS: dict = {}


def device_constants(device: torch.device, height: int, width: int, fill: Sequence[float]) -> dict:
    """Tensors every call needs, made once per (device, size, fill) and reused (no per-call copies)."""
    device = torch.device(device)
    key = (str(device), height, width, tuple(fill))
    if key not in _CONSTANTS:
        # ImageFilter.SMOOTH's integer weights (their sum, 13, divides afterwards): exact in float32 and in
        # the TF32 that cuDNN may use for a float32 convolution
        smooth = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
        _CONSTANTS[key] = {
            "levels": torch.arange(256, dtype=torch.int64).to(device),
            # output pixel centres, which PIL maps in double precision
            "centre_x": (torch.arange(width, dtype=torch.float64) + 0.5).view(1, 1, width).to(device),
            "centre_y": (torch.arange(height, dtype=torch.float64) + 0.5).view(1, height, 1).to(device),
            "smooth": smooth.expand(3, 1, 3, 3).contiguous().to(device),
            "zero": torch.zeros((), dtype=torch.float32).to(device),
            "no_image": torch.zeros((1,), dtype=torch.bool).to(device),  # `cubic` where one interpolation serves all
            "gray_weights": torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1).to(device),
            "fill_u8": torch.tensor(fill, dtype=torch.float32).to(torch.uint8).view(1, 1, 1, 3).to(device),
            # column offsets of a row's interpolation taps in the warp's edge-padded rows
            # (int32, as the warp's pixel indices: a padded batch of < 2**31 pixels)
            "linear_taps": torch.tensor([0, 1], dtype=torch.int32).view(2, 1).to(device),
            "cubic_taps": torch.tensor([-1, 0, 1, 2], dtype=torch.int32).view(4, 1).to(device),
        }
    return _CONSTANTS[key]


# ----------------------------------------------------------------------------------------------
# Host side: an op at a magnitude -> its row of parameters
# ----------------------------------------------------------------------------------------------

def _posterize_mask(bits: np.ndarray) -> np.ndarray:
    bits = np.clip(bits, 0, 8).astype(np.int64)
    return (0xFF << (8 - bits)) & 0xFF  # keep the `bits` most significant bits


def _solarize_threshold(m: np.ndarray) -> np.ndarray:  # min(256, int(m / 10 * 256))
    return np.minimum(np.trunc(np.abs(m) / LEVEL_DENOM * 256), 256)


def _enhance_factor(m):  # 'Color' etc.: [0.1, 1.9], unsigned
    return np.abs(m) / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_factor(m):  # 1 +- 0.9 m / 10, at least 0.1
    return np.maximum(1.0 + m / LEVEL_DENOM * 0.9, 0.1)


def _rotate(m, h, w, pct):
    angle = -np.deg2rad(m / LEVEL_DENOM * 30.0)  # Image.rotate: counter-clockwise about the centre
    cos, sin = np.cos(angle), np.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy


def _shear_x(m, h, w, pct):
    return 1.0, m / LEVEL_DENOM * 0.3, 0.0, 0.0, 1.0, 0.0


def _shear_y(m, h, w, pct):
    return 1.0, 0.0, 0.0, m / LEVEL_DENOM * 0.3, 1.0, 0.0


def _translate_x_rel(m, h, w, pct):
    return 1.0, 0.0, m / LEVEL_DENOM * pct * w, 0.0, 1.0, 0.0


def _translate_y_rel(m, h, w, pct):
    return 1.0, 0.0, 0.0, 0.0, 1.0, m / LEVEL_DENOM * pct * h


@dataclass(frozen=True)
class Op:
    """One RandAugment op: `columns(m, h, w, translate_pct)` gives its parameter columns for signed
    magnitudes m (numpy), as {column: values}; matrices are PIL's affine maps, source = A @ (x, y, 1),
    pixel centres at half-integers, origin at the image's top-left corner."""
    columns: Callable
    signed: bool  # RandAugment gives this op a random sign
    geometric: bool = False
    one_axis: bool = False  # a geometric op that moves pixels along one axis (GEOM_X, GEOM_Y)
    lut: int = LUT_STATIC
    blend: int = BLEND_NONE


def _lut_op(kind, factor=None, signed=False):
    return Op(lambda m, h, w, pct: {"lut": kind, **({"factor": factor(m)} if factor else {})}, signed, lut=kind)


def _blend_op(kind, factor, signed):
    return Op(lambda m, h, w, pct: {"blend": kind, "factor": factor(m)}, signed, blend=kind)


def _geometric_op(matrix, code: int):
    def columns(m, h, w, pct):
        names = ("a00", "a01", "a02", "a10", "a11", "a12")
        return {"geometric": code, **dict(zip(names, matrix(m, h, w, pct)))}
    return Op(columns, True, geometric=True, one_axis=code != GEOM_2D)


OPS: dict[str, Op] = {
    "AutoContrast": _lut_op(LUT_AUTOCONTRAST),
    "Equalize": _lut_op(LUT_EQUALIZE),
    "Invert": Op(lambda m, h, w, pct: {"threshold": 0}, False),  # solarize at 0 inverts every level
    # timm 'Posterize': keep int(m / 10 * 4) bits (0 bits at m < 2.5); increasing: 4 - that
    "Posterize": Op(lambda m, h, w, pct: {"and_mask": _posterize_mask(np.trunc(np.abs(m) / LEVEL_DENOM * 4))},
                    False),
    "PosterizeIncreasing": Op(
        lambda m, h, w, pct: {"and_mask": _posterize_mask(4 - np.trunc(np.abs(m) / LEVEL_DENOM * 4))}, False),
    # threshold min(256, int(m / 10 * 256)) (weaker with magnitude); increasing: 256 - that
    "Solarize": Op(lambda m, h, w, pct: {"threshold": _solarize_threshold(m)}, False),
    "SolarizeIncreasing": Op(lambda m, h, w, pct: {"threshold": 256 - _solarize_threshold(m)}, False),
    # add min(128, int(m / 10 * 110)) to pixels below 128, saturating
    "SolarizeAdd": Op(lambda m, h, w, pct: {"add": np.minimum(np.trunc(np.abs(m) / LEVEL_DENOM * 110), 128)},
                      False),
    "Color": _blend_op(BLEND_COLOR, _enhance_factor, False),
    "ColorIncreasing": _blend_op(BLEND_COLOR, _enhance_increasing_factor, True),
    "Contrast": _lut_op(LUT_CONTRAST, _enhance_factor),
    "ContrastIncreasing": _lut_op(LUT_CONTRAST, _enhance_increasing_factor, True),
    "Brightness": _lut_op(LUT_BRIGHTNESS, _enhance_factor),
    "BrightnessIncreasing": _lut_op(LUT_BRIGHTNESS, _enhance_increasing_factor, True),
    "Sharpness": _blend_op(BLEND_SHARPNESS, _enhance_factor, False),
    "SharpnessIncreasing": _blend_op(BLEND_SHARPNESS, _enhance_increasing_factor, True),
    "Rotate": _geometric_op(_rotate, GEOM_2D),
    "ShearX": _geometric_op(_shear_x, GEOM_X),
    "ShearY": _geometric_op(_shear_y, GEOM_Y),
    "TranslateXRel": _geometric_op(_translate_x_rel, GEOM_X),
    "TranslateYRel": _geometric_op(_translate_y_rel, GEOM_Y),
}
OP_NAMES = tuple(OPS)
SIGNED_OPS = tuple(name for name, op in OPS.items() if op.signed)


def lookup_op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; valid ops: {', '.join(OP_NAMES)}")
    return OPS[name]


def layer_columns(ops: Sequence[str], op_index: np.ndarray, applied: np.ndarray, magnitude: np.ndarray,
                  bicubic: np.ndarray, height: int, width: int, translate_pct: float) -> np.ndarray:
    """(batch, NUM_COLUMNS) float64: each image's op of one layer as parameters; identity where not applied."""
    rows = np.tile(_IDENTITY_ROW, (op_index.shape[0], 1))
    rows[:, _C["bicubic"]] = bicubic
    for k, name in enumerate(ops):
        sel = np.flatnonzero(applied & (op_index == k))  # host-side numpy: shapes vary only here
        if sel.size:
            for column, values in OPS[name].columns(magnitude[sel], height, width, translate_pct).items():
                rows[sel, _C[column]] = values
    return rows


STAGES = ("hist", "blend", "warp")  # the stages that run on listed images only


def op_stages(op: "Op") -> tuple[bool, bool, bool]:
    """Which costly stages of `STAGES` an op needs."""
    return op.lut in (LUT_AUTOCONTRAST, LUT_EQUALIZE, LUT_CONTRAST), op.blend != BLEND_NONE, op.geometric


def stage_members(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Which images of a layer (rows of `layer_columns`) each costly stage must process."""
    lut = rows[:, _C["lut"]]
    return {"hist": (lut == LUT_AUTOCONTRAST) | (lut == LUT_EQUALIZE) | (lut == LUT_CONTRAST),
            "blend": rows[:, _C["blend"]] != BLEND_NONE,
            "warp": rows[:, _C["geometric"]] > 0.5}


def stage_capacity(batch: int, p: float) -> int:
    """Images a stage gathers when each image needs it with probability p: the mean plus 6 standard
    deviations plus 4 (a binomial count exceeds it with probability about 1e-9), at most the batch."""
    if p <= 0:
        return min(batch, 1)
    if p >= 1:
        return batch
    return min(batch, int(math.ceil(batch * p + 6.0 * math.sqrt(batch * p * (1.0 - p)) + 4.0)))


def stage_indices(rows: np.ndarray, nominal: Sequence[int]) -> tuple[int, ...]:
    """Write each costly stage's image list into `rows` (in place); returns the caps of this call.

    nominal: the cap per stage of `STAGES` (`stage_capacity`); a stage with more members than its cap
    takes the whole batch in this call. Rows 0..cap-1 of `<stage>_idx` list the members in order, padded
    with an image that is no member: its own columns say it needs nothing, so its row is skipped or
    written back unchanged (by every pad row alike), and never collides with a member's."""
    batch = rows.shape[0]
    caps = []
    for stage, cap, members in zip(STAGES, nominal, stage_members(rows).values()):
        listed = np.flatnonzero(members)
        cap = batch if listed.size > cap else cap
        pad = np.flatnonzero(~members)[0] if listed.size < cap else 0  # fewer members than rows: some image is none
        index = np.full(cap, pad, dtype=np.float64)
        index[:listed.size] = listed
        rows[:cap, _C[f"{stage}_idx"]] = index
        caps.append(cap)
    return tuple(caps)


@dataclass(frozen=True)
class Stages:
    """Which device stages an op set can need; fixed for a RandAugment, so every call issues the same kernels."""
    histogram: bool  # AutoContrast, Equalize
    contrast: bool  # Contrast: a blend with the image's grey mean, as a LUT
    lut_blend: bool  # Contrast, Brightness: blends with a constant, as LUTs
    color: bool
    sharpness: bool
    warp: bool

    @classmethod
    def of(cls, names: Sequence[str], prob: float = 1.0) -> "Stages":
        """The stages of an op set whose ops are drawn uniformly and applied with probability `prob`."""
        ops = [lookup_op(n) for n in names]
        return cls(histogram=any(op.lut in (LUT_AUTOCONTRAST, LUT_EQUALIZE) for op in ops),
                   contrast=any(op.lut == LUT_CONTRAST for op in ops),
                   lut_blend=any(op.lut in (LUT_CONTRAST, LUT_BRIGHTNESS) for op in ops),
                   color=any(op.blend == BLEND_COLOR for op in ops),
                   sharpness=any(op.blend == BLEND_SHARPNESS for op in ops),
                   warp=any(op.geometric for op in ops))


# ----------------------------------------------------------------------------------------------
# Device side: one layer over the whole batch
# ----------------------------------------------------------------------------------------------

def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor) for 8-bit images: in1 + alpha (in2 - in1) in float32
    (a product, then a sum, each rounded to float32), clamped, truncated.

    Each float32 rounding is written out: the float64 product of a float32 factor and an integer
    difference is exact, and so is the float64 sum of that float32 product and an integer, so casting
    each to float32 rounds exactly as PIL's float arithmetic does. A compiler cannot fuse the two into
    one FMA (as inductor's C++ and Triton code would with a plain `deg + f * (x - deg)`, or with
    torch.lerp), so eager, compiled, CPU and GPU all give PIL's bytes.

    Eager, nothing fuses, and float32 operations round exactly as those float64 steps then do (the
    exact product and sum, rounded once to float32): so eager runs them in float32, with half the bytes
    and four fewer kernels, and the same pixels."""
    if not torch.compiler.is_compiling():
        deg = degenerate.float()
        return (factor.float() * (x.float() - deg)).add_(deg).clamp_(0, 255).to(torch.uint8)
    deg = degenerate.double()
    product = (factor.double() * (x.double() - deg)).float()
    return (product.double() + deg).float().clamp_(0, 255).to(torch.uint8)


def _grayscale_pil(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded), as int32 (b, 1, h, w);
    `weights`: the int32 (1, 3, 1, 1) constant `gray_weights` (19595, 38470, 7471): exact integer sums."""
    return ((x.to(torch.int32) * weights).sum(dim=1, keepdim=True, dtype=torch.int32) + 0x8000) >> 16


def grey_mean_reference(x: torch.Tensor, consts: dict) -> torch.Tensor:
    """The definition of `kernels.grey_mean` in torch ops (the tests' oracle): each image's mean grey level."""
    return _grayscale_pil(x, consts["gray_weights"]).double().mean(dim=(1, 2, 3))


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, 256) int64 pixel counts per image and channel (one kernel: `histogram_reference` in torch ops)."""
    return kernels.histogram(x).long()


def histogram_reference(x: torch.Tensor) -> torch.Tensor:
    """The definition of `kernels.histogram` in torch ops (the tests' oracle), as int64."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    # scatter, not bincount (bincount syncs on CUDA); int32 counts (exact: h * w < 2**31) and a
    # broadcast one instead of a ones tensor the size of the batch
    hist = torch.zeros(b * c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(1, flat, torch.ones((1, 1), dtype=torch.int32, device=x.device).expand_as(flat))
    return hist.view(b, c, 256).long()


def _autocontrast_lut(hist: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    present = (hist > 0).to(torch.int8)
    lo = present.argmax(dim=-1).double()  # first level present
    hi = (255 - present.flip(-1).argmax(dim=-1)).double()  # last level present
    scale = 255.0 / (hi - lo).clamp(min=1)
    offset = -lo * scale
    # float64 and truncation, as ImageOps.autocontrast builds its LUT in Python floats
    lut = torch.trunc(levels.double() * scale[..., None] + offset[..., None]).clamp(0, 255)
    return torch.where((hi > lo)[..., None], lut, levels.double()).to(torch.uint8)


def _equalize_lut(hist: torch.Tensor, levels: torch.Tensor, pixels: int) -> torch.Tensor:
    present = (hist > 0).to(torch.int8)
    top = 255 - present.flip(-1).argmax(dim=-1, keepdim=True)  # the highest level present
    step = (pixels - hist.gather(-1, top)) // 255  # ImageOps.equalize: (total - count of top value) // 255
    distinct = present.sum(dim=-1, keepdim=True)
    before = torch.cumsum(hist, dim=-1) - hist
    lut = (step // 2 + before) // step.clamp(min=1)
    return torch.where((step > 0) & (distinct > 1), lut.clamp(max=255), levels).to(torch.uint8)


def apply_lut_reference(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The definition of `kernels.apply_lut` (which the layer runs: one kernel, uint8 in and out) in torch
    ops, and the tests' oracle. Per-(image, channel) lookup: lut is (b, 3, 256) uint8. One uint8 gather with int32 indices
    (uint8 pixel + int32 table offset: one op, no int64 copy), in x's memory order (a channels_last
    batch stays so)."""
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)  # a view; contiguous for a channels_last batch
    base = (torch.arange(b * c, dtype=torch.int32, device=x.device) * 256).view(b, 1, 1, c)
    index = torch.add(nhwc, base)  # int32 by type promotion
    out = lut.reshape(-1).index_select(0, index.reshape(-1)).view(b, h, w, c).permute(0, 3, 1, 2)
    if torch.compiler.is_compiling():  # a tensor of its own, not a view: later stages write into it in place,
        return out.clone(memory_format=torch.channels_last)  # which a compiler's functional graph cannot undo
    return out  # through the view (a compiler fuses the copy away; eager has no need of it)


def _listed(cols: torch.Tensor, stage: str, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images a stage works on (`stage_indices`): their indices (cap,) and their columns."""
    rows = cols.narrow(0, 0, cap)  # not cols[:cap], which skips the op when cap is the batch
    index = rows[:, _C[f"{stage}_idx"]].long()
    return index, cols.index_select(0, index)


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Images `index` of a batch, in its memory format (index_select alone returns NCHW, and mixing
    formats makes every later op stride across channels)."""
    if memory_format(x) == torch.channels_last:
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def _put_images(out: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Images `index` of `out` (uint8 (b, 3, h, w), a tensor this layer made) replaced in place by `result`
    where `keep` (the image needs the stage; not so for a pad row): one kernel (`_put_back` in torch ops)."""
    kernels.put_rows_(out, index, keep, result)
    return out


def _put_back(out: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, result: torch.Tensor,
              before: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `out` (a tensor this layer made; `before` = those rows) replaced in place by
    `result` where `keep` (the image needs the stage; not so for a placeholder row), else by their own
    value: fixed shapes, and pad rows (repeats of one listed row) write identical values."""
    keep = keep.view(-1, *([1] * (out.ndim - 1)))
    return out.index_copy_(0, index, torch.where(keep, result, before))


def _lut_stage(x, cols, stages: Stages, consts, hist_cap: int):
    b = x.shape[0]
    levels = consts["levels"]
    kind = cols[:, _C["lut"]].view(b, 1, 1)
    v = levels & cols[:, _C["and_mask"]].long().view(b, 1, 1)  # posterize
    v = torch.where(v < cols[:, _C["threshold"]].long().view(b, 1, 1), v, 255 - v)  # solarize, invert
    v = torch.where(v < 128, (v + cols[:, _C["add"]].long().view(b, 1, 1)).clamp(max=255), v)  # solarize-add
    lut = v.to(torch.uint8).expand(b, 3, 256)
    own = None
    if stages.histogram or stages.contrast:  # statistics of the listed images only (`STAGES`' "hist")
        index, picked_cols = _listed(cols, "hist", hist_cap)
        picked = _pick(x, index)
        picked_kind = picked_cols[:, _C["lut"]].view(-1, 1, 1)
        if stages.histogram:  # AutoContrast, Equalize: LUTs from the histograms
            hist = _histogram(picked)
            own = torch.where(picked_kind == LUT_AUTOCONTRAST, _autocontrast_lut(hist, levels),
                              _equalize_lut(hist, levels, x.shape[2] * x.shape[3]))
    if stages.lut_blend:  # brightness: a blend with black; contrast: with the rounded grey mean
        degenerate = torch.zeros((b, 1, 1), dtype=torch.float64, device=x.device)
        if stages.contrast:  # the means of the listed images, in their rows (every Contrast image is listed)
            mean = kernels.grey_mean(picked).view(-1, 1, 1)  # one kernel: `grey_mean_reference` in torch ops
            own_mean = torch.where(picked_kind == LUT_CONTRAST, torch.floor(mean + 0.5), 0.0)  # 0: placeholder rows
            degenerate = degenerate.index_copy_(0, index, own_mean)
        blended = _blend(degenerate, levels.view(1, 1, 256), cols[:, _C["factor"]].float().view(b, 1, 1))
        lut = torch.where((kind == LUT_CONTRAST) | (kind == LUT_BRIGHTNESS), blended, lut)
    if own is not None:
        lut = lut.contiguous()
        keep = (picked_kind == LUT_AUTOCONTRAST) | (picked_kind == LUT_EQUALIZE)
        lut = _put_back(lut, index, keep, own, lut.index_select(0, index))
    return kernels.apply_lut(x, lut)


def enhance_reference(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor, consts: dict) -> torch.Tensor:
    """The definition of `kernels.enhance` in torch ops (the tests' oracle): each uint8 image blended with
    its grey self (kind BLEND_COLOR) or its SMOOTH-filtered self (BLEND_SHARPNESS) at its float32 factor."""
    kind = _col(kind)
    degenerate = torch.where(kind == BLEND_SHARPNESS, _smooth_pil(x, consts["smooth"]), x)
    degenerate = torch.where(kind == BLEND_COLOR, _grayscale_pil(x, consts["gray_weights"]), degenerate)
    return _blend(degenerate, x, _col(factor).float())


def _smooth_pil(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """PIL's 3x3 SMOOTH filter, rounded; the one-pixel border stays as it was."""
    out = x.clone()
    if x.shape[2] > 2 and x.shape[3] > 2:
        smooth = F.conv2d(x.float(), kernel, groups=3) / 13.0  # an exact integer sum, then one rounding
        out[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5).clamp_(0, 255).to(torch.uint8)
    return out


def _linear(v2, v3, d):
    """PIL's BILINEAR macro, v2 + (v3 - v2) d, in float32 (v2, v3: float32, or int16 pixels)."""
    return v2 + d * (v3 - v2)


def _cubic(v1, v2, v3, v4, d, bicubic: torch.Tensor | None, zero: torch.Tensor | None = None):
    """PIL's BICUBIC macro (Geometry.c: cubic convolution with a = -1) in float32; where `bicubic` is
    False the same polynomial with p3 = p4 = 0 is PIL's bilinear v2 + d (v3 - v2), bit for bit.
    `zero`: a float32 0-d tensor (the constant `zero`), so that no call makes one. The taps may be int16
    pixels: p2, p3, p4 are then exact integers, as in float32, and each product with d is float32."""
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    if bicubic is None:
        return v2 + d * ((v3 - v1) + d * (p3 + d * p4))
    # bilinear: p2 = v3 - v2 and p3 + d p4 = 0 (+0.0, as p3 = p4 = 0 would give)
    p2 = v3 - torch.where(bicubic, v1, v2)
    return v2 + d * (p2 + d * torch.where(bicubic, p3 + d * p4, zero))


def warp_reference(x: torch.Tensor, mats: torch.Tensor, consts: dict, interpolation: str,
                   bicubic: torch.Tensor | None = None) -> torch.Tensor:
    """PIL's Image.transform(AFFINE) for a batch, one matrix per image (b, 2, 3) float64, in torch ops: the
    definition of `kernels.warp_affine` (which the layer runs: one kernel, uint8 in and out, the same
    bytes) and the tests' oracle.

    PIL maps each output pixel centre to a source point in double precision, fills the pixel when
    that point lies outside the image, and otherwise interpolates between edge-clamped neighbours
    and truncates. We do the same: float64 coordinates, gathers of the neighbours from an
    edge-padded copy, float32 interpolation. (grid_sample was the first choice, but its float32
    normalised coordinates put exact pixel centres a hair off, and truncation turns that into
    off-by-one pixels even for the identity.) `interpolation` 'random' takes a per-image bool
    `bicubic` (b,): bicubic where True, bilinear elsewhere. The result is channels_last in memory.
    """
    b, c, h, w = x.shape
    a = mats.view(b, 6, 1, 1).unbind(1)
    cx, cy = consts["centre_x"], consts["centre_y"]
    # a0 x + a1 y + a2 as PIL's affine_transform writes it (pointwise, so a compiler fuses it), then
    # PIL's `xin -= 0.5`: (b, h, w) each, in pixel index units
    src_x = a[0] * cx + a[1] * cy + a[2] - 0.5
    src_y = a[3] * cx + a[4] * cy + a[5] - 0.5
    inside = ((src_x >= -0.5) & (src_y >= -0.5) & (src_x < w - 0.5) & (src_y < h - 0.5)).view(b, h, w, 1)
    cubic = interpolation in ("bicubic", "random")
    pad = 2 if cubic else 1
    # gather uint8 pixels (a quarter of the bytes of float), interpolate in int16 and float32
    padded = F.pad(x.contiguous(memory_format=torch.channels_last), (pad,) * 4, mode="replicate")
    rows = padded.permute(0, 2, 3, 1).reshape(-1, c)  # (b * (h+2pad) * (w+2pad), c), a view
    stride = w + 2 * pad
    corner_x, corner_y = ((s.floor() if interpolation != "nearest" else (s + 0.5).floor()) for s in (src_x, src_y))
    # index into the padded image; clamped only to stay in memory for points that get the fill
    if b * (h + 2 * pad) * stride >= 2**31:
        raise ValueError(f"warp: a batch of {b} images of {h} x {w} has too many pixels for int32 indices; "
                         "augment it in parts")
    ix = corner_x.clamp(-1, w - 1).to(torch.int32) + pad
    iy = corner_y.clamp(-1, h - 1).to(torch.int32) + pad
    first_row = torch.arange(b, dtype=torch.int32, device=x.device).view(b, 1, 1) * (h + 2 * pad)
    base = (first_row + iy) * stride + ix  # (b, h, w) int32: the top-left tap in the padded rows

    if interpolation == "nearest":
        out = rows.index_select(0, base.view(-1)).view(b, h, w, c)
    else:
        taps_at = consts["cubic_taps" if cubic else "linear_taps"]  # (k, 1) offsets along a row
        k = taps_at.shape[0]
        dx, dy = ((s - corner).float().view(b, h, w, 1) for s, corner in ((src_x, corner_x), (src_y, corner_y)))
        flag = bicubic.view(b, 1, 1, 1) if interpolation == "random" else None

        def interpolate(taps, d, part_flag):
            return _cubic(*taps, d, part_flag, consts["zero"]) if cubic else _linear(*taps, d)

        # all k x k neighbours in one uint8 gather: rows iy - 1 .. iy + 2 (or iy, iy + 1), each k columns
        offsets = taps_at.view(1, k) + taps_at * stride  # (row, column)
        index = (base.reshape(1, -1) + offsets.view(k * k, 1)).view(-1)
        gathered = rows.index_select(0, index).view(k, k, b, h, w, c).unbind(0)
        # int16 taps: the sums and differences of the polynomials are exact integers either way, in
        # half the bytes of float32; the products with the fraction promote to float32 as before
        rows_2d = [interpolate(taps.to(torch.int16).unbind(0), dx, flag) for taps in gathered]
        # to uint8 as PIL does: clamped, truncated
        out = interpolate(rows_2d, dy, flag).clamp_(0, 255).to(torch.uint8)
    # the fill outside the source image (a whole number: choosing it after the truncation is the same)
    return torch.where(inside, out, consts["fill_u8"]).permute(0, 3, 1, 2)


def apply_layer(x: torch.Tensor, cols: torch.Tensor, stages: Stages, consts: dict, interpolation: str,
                caps: Sequence[int]) -> torch.Tensor:
    """One RandAugment layer on uint8 (b, 3, H, W): `cols` (b, NUM_COLUMNS) float64 on x's device, with
    the image lists of `stage_indices`, whose returned caps (one per `STAGES`) are `caps`.

    The kernels issued depend only on x's shape, `stages`, `interpolation` and `caps`, never on `cols`.
    """
    hist_cap, blend_cap, warp_cap = caps
    out = _lut_stage(x, cols, stages, consts, hist_cap)
    if stages.color or stages.sharpness:  # Color, Sharpness: on the listed images only
        index, picked_cols = _listed(cols, "blend", blend_cap)
        picked = _pick(out, index)  # = x's rows: an image that draws a blend has an identity LUT
        kind = picked_cols[:, _C["blend"]]
        # one kernel: each image blended with its grey (Color) or smoothed (Sharpness) self, as
        # `enhance_reference` defines it
        blended = kernels.enhance(picked, kind.to(torch.int8), picked_cols[:, _C["factor"]].float())
        out = _put_images(out, index, kind != BLEND_NONE, blended)
    if stages.warp:  # geometric ops: on the listed images only (an image with a geometric op has an identity LUT)
        index, picked_cols = _listed(cols, "warp", warp_cap)
        picked = _pick(out, index)
        mats = picked_cols[:, _C["a00"]:_C["a12"] + 1].reshape(-1, 2, 3)
        bicubic = picked_cols[:, _C["bicubic"]] > 0.5 if interpolation == "random" else None
        # one kernel: each image's map says whether it needs the 2-d interpolation (Rotate) or the 1-d one
        # along the axis its pixels move (Shear, Translate), which gives the same bytes from a quarter of the taps
        geometric = picked_cols[:, _C["geometric"]]
        active = geometric > 0.5  # not the pad rows, whose results are thrown away
        axes = torch.where(geometric == GEOM_X, kernels.AXIS_X, torch.where(geometric == GEOM_Y, kernels.AXIS_Y,
                                                                             kernels.AXIS_2D)).to(torch.int8)
        cubic = bicubic if bicubic is not None else consts["no_image"].expand(picked.shape[0])
        warped = kernels.warp_affine(picked, mats.reshape(-1, 6), cubic, axes, active, consts["fill_u8"].view(3),
                                     kernels.MODES[interpolation])
        out = _put_images(out, index, active, warped)
    return out


def apply_op(name: str, images: torch.Tensor, magnitudes, *, fill: int | Sequence[int] = TIMM_FILL,
             interpolation: str = "bilinear", translate_pct: float = 0.45) -> torch.Tensor:
    """Apply one RandAugment op to every image of a uint8 NCHW batch, each at its own magnitude.

    `magnitudes`: a number or a (batch,) array/tensor on timm's 0..10 scale, already signed: for the
    ops in SIGNED_OPS a negative magnitude is what timm's `_randomly_negate` gives when it flips the
    sign (negative angle, shear, translation, or enhancement factor below 1 for the *Increasing ops).
    Unsigned ops use the absolute value. No clamping happens here: RandAugment clamps before the sign.
    `interpolation`: 'bilinear', 'bicubic' or 'nearest' (one for all images). This runs the same
    layer code as RandAugment; the magnitudes are read on the host (a device tensor costs a sync).
    """
    check_images(images, "apply_op", uint8=True)
    lookup_op(name)
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear', 'bicubic' or 'nearest', got {interpolation!r}")
    batch, _, h, w = images.shape
    m = np.asarray(torch.as_tensor(magnitudes, dtype=torch.float64).cpu())
    m = np.broadcast_to(m, (batch,)) if m.ndim == 0 else m
    if m.shape != (batch,):
        raise ValueError(f"magnitudes must be a number or shaped ({batch},), got {tuple(m.shape)}")
    if batch == 0:
        return images.clone()
    cols = layer_columns((name,), np.zeros(batch, np.int64), np.ones(batch, bool), m,
                         np.full(batch, interpolation == "bicubic"), h, w, translate_pct)
    caps = stage_indices(cols, (batch,) * len(STAGES))
    consts = device_constants(images.device, h, w, fill_values(fill))
    out = apply_layer(images, to_device(cols, images.device), Stages.of((name,)), consts, interpolation, caps)
    return out.contiguous(memory_format=memory_format(images))
