"""PIL's antialiased resize of a box, in numba: the FFCV backend's crop resize.

`resize_box(src, top, left, h, w, dst, bicubic, flip, crop_first)` gives the pixels of
`Image.fromarray(src).resize((W, H), BILINEAR or BICUBIC, box=(left, top, left + w, top + h))`
(crop_first: of `.crop(box).resize((W, H), ...)`, the train reads'), then mirrored when flip, within
2 grey levels and equal for most boxes (tests/test_loaders.py: Pillow 13 may run its two passes in
the other order): it follows Pillow's libImaging/Resample.c:

- per output pixel, a filter centred at in0 + (x + 0.5) * scale with support widened by the
  downscale factor (antialiasing), taps clipped to the image (not to the box: pixels just outside
  the box are read, as PIL does; crop_first: clipped to the box, as for a cropped image), weights
  normalised to sum 1 and rounded to 22-bit fixed point;
- a horizontal pass over the rows the vertical pass needs, rounded to uint8, then a vertical pass;
- filters: bilinear = triangle on [-1, 1]; bicubic = Keys' cubic with a = -0.5 on [-2, 2].

Why not FFCV's own `resize_crop`: it is OpenCV INTER_AREA, fixed inside libffcv, and upsampling
with INTER_AREA acts almost like nearest-neighbour, while timm trains on PIL bilinear/bicubic.
"""
from __future__ import annotations

import math

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_ONE = 1 << PRECISION_BITS


def _build(jit):
    @jit
    def _filter(x, bicubic):
        if x < 0.0:
            x = -x
        if bicubic:
            a = -0.5
            if x < 1.0:
                return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            if x < 2.0:
                return (((x - 5.0) * x + 8.0) * x - 4.0) * a
            return 0.0
        if x < 1.0:
            return 1.0 - x
        return 0.0

    @jit
    def coefficients(in_size, in0, in1, out_size, bicubic):
        """(first tap, tap count) per output pixel, and fixed-point weights (Pillow's precompute_coeffs)."""
        scale = (in1 - in0) / out_size
        filterscale = scale if scale > 1.0 else 1.0
        support = (2.0 if bicubic else 1.0) * filterscale
        ksize = int(math.ceil(support)) * 2 + 1
        bounds = np.zeros((out_size, 2), np.int64)
        kk = np.zeros((out_size, ksize), np.int64)
        w = np.zeros(ksize, np.float64)
        ss = 1.0 / filterscale
        for xx in range(out_size):
            center = in0 + (xx + 0.5) * scale
            xmin = int(center - support + 0.5)  # C's (int) truncates, as int() does
            if xmin < 0:
                xmin = 0
            xmax = int(center + support + 0.5)
            if xmax > in_size:
                xmax = in_size
            xmax -= xmin
            total = 0.0
            for x in range(xmax):
                w[x] = _filter((x + xmin - center + 0.5) * ss, bicubic)
                total += w[x]
            for x in range(xmax):
                v = w[x] / total if total != 0.0 else w[x]
                kk[xx, x] = int(-0.5 + v * _ONE) if v < 0.0 else int(0.5 + v * _ONE)
            bounds[xx, 0] = xmin
            bounds[xx, 1] = xmax
        return bounds, kk

    @jit
    def _clip8(acc):
        if acc <= 0:
            return 0
        if acc >= (256 << PRECISION_BITS):
            return 255
        return acc >> PRECISION_BITS

    @jit
    def resize_box(src, top, left, h, w, dst, bicubic, flip, crop_first):
        """Resize the box (top, left, h, w) of src (HxWx3 uint8) into dst (uint8), as PIL; mirror when flip.

        crop_first: the box is whole pixels and cut out first, `Image.crop(box).resize(...)` (taps clipped
        to the box); else `Image.resize(box=...)` of a box that may be fractional (taps clipped to src)."""
        out_h, out_w = dst.shape[0], dst.shape[1]
        if crop_first:
            bh, kh = coefficients(int(w), 0.0, float(w), out_w, bicubic)
            bv, kv = coefficients(int(h), 0.0, float(h), out_h, bicubic)
            bh[:, 0] += int(left)
            bv[:, 0] += int(top)
        else:
            bh, kh = coefficients(src.shape[1], float(left), float(left + w), out_w, bicubic)
            bv, kv = coefficients(src.shape[0], float(top), float(top + h), out_h, bicubic)
        y_first = bv[0, 0]
        y_last = bv[out_h - 1, 0] + bv[out_h - 1, 1]
        half = 1 << (PRECISION_BITS - 1)
        # horizontal pass over the rows the vertical pass reads, rounded to uint8 as Pillow does
        tmp = np.empty((y_last - y_first, out_w * 3), np.uint8)
        kh32 = kh.astype(np.int32)  # int32 sums as Pillow's: |sum| < 255 * 1.25 * 2**22 < 2**31
        half32 = np.int32(half)
        for y in range(y_last - y_first):
            row = src[y + y_first]
            for xx in range(out_w):
                x0 = bh[xx, 0]
                a0 = a1 = a2 = half32
                for x in range(bh[xx, 1]):
                    k = kh32[xx, x]
                    a0 += np.int32(row[x0 + x, 0]) * k
                    a1 += np.int32(row[x0 + x, 1]) * k
                    a2 += np.int32(row[x0 + x, 2]) * k
                tmp[y, 3 * xx] = _clip8(a0)
                tmp[y, 3 * xx + 1] = _clip8(a1)
                tmp[y, 3 * xx + 2] = _clip8(a2)
        # vertical pass: whole rows at a time (contiguous, vectorisable)
        acc = np.empty(out_w * 3, np.int32)
        for yy in range(out_h):
            y0 = bv[yy, 0] - y_first
            acc[:] = half
            for y in range(bv[yy, 1]):
                k = np.int32(kv[yy, y])
                line = tmp[y0 + y]
                for i in range(out_w * 3):
                    acc[i] += np.int32(line[i]) * k
            for xx in range(out_w):
                ox = out_w - 1 - xx if flip else xx
                for c in range(3):
                    dst[yy, ox, c] = _clip8(acc[3 * xx + c])

    @jit
    def support_margin(in_extent, out_size, bicubic):
        """Source pixels beyond a box edge that the resize of that box reads (for ROI-decoding a box)."""
        scale = in_extent / out_size
        return int(math.ceil((2.0 if bicubic else 1.0) * (scale if scale > 1.0 else 1.0))) + 1

    return coefficients, resize_box, support_margin


_NUMBA = None
coefficients, _, support_margin = _build(lambda f: f)  # plain Python (resize_box is only usable compiled)


def numba_functions():
    """(coefficients, resize_box, support_margin) compiled by numba (on first use, a few seconds)."""
    global _NUMBA
    if _NUMBA is None:
        import numba

        _NUMBA = _build(numba.njit(cache=False, nogil=True))
    return _NUMBA
