"""Fused kernels for the train augmentation's pixel work: one kernel per step, uint8 in and uint8 out.

Written out as eager torch ops, RandAugment's affine warp materialised a float32 copy of every tap and
every partial sum, and mixup + normalise three float32 copies of the batch: in all, 29 MiB read and written
per 160-px image at batch 512, several times what the GPU target allows (`fastrsb bench aug`,
benchmarks/results/cpu-2core-aug-11aa6ab-2026-12-03.jsonl). Here each step is one kernel:

  warp_affine    PIL's affine transform (float64 source coordinates, float32 bilinear or bicubic
                 interpolation, clamp and truncation, the fill outside), 1-d along the axis a shear or
                 translation moves (the 2-d result, bit for bit, from a quarter of the taps)
  apply_lut      the per-(image, channel) lookup table of the LUT stage
  histogram      per-(image, channel) counts for AutoContrast and Equalize
  grey_mean      Contrast's mean grey level
  enhance        Color and Sharpness: PIL's blend with the grey or the SMOOTH-filtered image
  put_rows_      a stage's images written back into the batch, in place
  mix_normalize  mixup/cutmix with the partner image, then (x / 255 - mean) / std, into float32 or bf16

Each does the arithmetic of its torch-op definition (`ops.warp_reference`, `apply_lut_reference`,
`histogram_reference`, `grey_mean_reference`, `enhance_reference`; `MixupCutmix.apply_packed` then
`normalize`) in the same order and precision, so the bytes are equal (tests/test_kernels.py).

Each is a torch custom op (`torch.library.custom_op`), so eager calls, `torch.compile` (which calls it
as it is) and the traffic trace all see one op:
  * CPU: numba, compiled once and cached on disk, over blocks of rows split across torch's thread
    count (`cpu_threads`; numba's own threading layer is not used: it warns when a process forks);
  * CUDA: Triton, one program per image and block of pixels, with floating-point contraction off
    (`enable_fp_fusion=False`): a fused multiply-add rounds once where PIL rounds twice, and where torch
    rounds once (lerp, addcmul) the kernel says so with `tl.fma`. The CUDA kernels are tested on the CPU
    in Triton's interpreter; they have not run on a GPU yet.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

NEAREST, BILINEAR, BICUBIC, RANDOM = range(4)  # the warp's `interpolation`
MODES = {"nearest": NEAREST, "bilinear": BILINEAR, "bicubic": BICUBIC, "random": RANDOM}
AXIS_2D, AXIS_X, AXIS_Y = range(3)  # a map that moves pixels along both axes, x only, y only


# ---------------------------------------------------------------------------------------------- CPU

try:
    import numba
except ImportError:  # numba comes with fastrsb's requirements; say so when a kernel is first needed
    numba = None


def _njit(**options):
    """numba.njit (nogil, cached on disk) where numba is installed; else a function that says what is missing."""
    def wrap(fn):
        if numba is not None:
            return numba.njit(nogil=True, cache=True, **options)(fn)

        def missing(*args, **kwargs):
            raise ImportError("fastrsb's CPU augmentation kernels need numba: pip install numba")
        return missing
    return wrap


@_njit(inline="always")
def _interp(v1, v2, v3, v4, d, cubic):
    """PIL's BICUBIC (a = -1) and BILINEAR macros in float32, each operation rounded as in the reference."""
    if cubic:
        two = np.float32(2.0)
        p3 = two * (v1 - v2) + v3 - v4
        p4 = v2 - v1 - v3 + v4
        return v2 + d * ((v3 - v1) + d * (p3 + d * p4))
    return v2 + d * (v3 - v2)


@_njit(inline="always")
def _clamp(v, hi):
    return 0 if v < 0 else (hi if v > hi else v)


@_njit(inline="always")
def _to_u8(v):
    return np.uint8(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))  # clamp, then truncate


@_njit(inline="always")
def _tap(src, i, y, x, ch):
    return np.float32(src[i, y, x, ch])


@_njit(inline="always")
def _line(src, i, ya, xa, yb, xb, yc, xc, yd, xd, d, cubic, ch):
    # one interpolation along a line of taps a, b, c, d (bilinear reads b and c only)
    if cubic:
        return _interp(_tap(src, i, ya, xa, ch), _tap(src, i, yb, xb, ch), _tap(src, i, yc, xc, ch),
                       _tap(src, i, yd, xd, ch), d, True)
    v = _tap(src, i, yb, xb, ch)
    return v + d * (_tap(src, i, yc, xc, ch) - v)


@_njit()
def _warp_rows(src, mats, cubic_flags, axes, active, fill, nearest, out, start, stop, step):
    _, h, w, c = src.shape
    for i in range(start, stop, step):  # whole images: a thread's pages are its own
        if not active[i]:
            continue
        a0, a1, a2, a3, a4, a5 = mats[i, 0], mats[i, 1], mats[i, 2], mats[i, 3], mats[i, 4], mats[i, 5]
        cubic = cubic_flags[i]
        axis = axes[i]
        for y in range(h):
            cy = y + 0.5
            for x in range(w):
                cx = x + 0.5
                sx = a0 * cx + a1 * cy + a2 - 0.5
                sy = a3 * cx + a4 * cy + a5 - 0.5
                if not (sx >= -0.5 and sy >= -0.5 and sx < w - 0.5 and sy < h - 0.5):
                    for ch in range(c):
                        out[i, y, x, ch] = fill[ch]
                    continue
                if nearest:
                    px = _clamp(int(math.floor(sx + 0.5)), w - 1)
                    py = _clamp(int(math.floor(sy + 0.5)), h - 1)
                    for ch in range(c):
                        out[i, y, x, ch] = src[i, py, px, ch]
                    continue
                fx = math.floor(sx)
                fy = math.floor(sy)
                ix = int(fx)
                iy = int(fy)
                x1, x2 = _clamp(ix, w - 1), _clamp(ix + 1, w - 1)
                y1, y2 = _clamp(iy, h - 1), _clamp(iy + 1, h - 1)
                if axis != 0:  # along the one axis the map moves (the 2-d result, bit for bit: the other d is 0)
                    x0, x3 = _clamp(ix - 1, w - 1), _clamp(ix + 2, w - 1)
                    y0, y3 = _clamp(iy - 1, h - 1), _clamp(iy + 2, h - 1)
                    for ch in range(c):
                        if axis == 1:
                            v = _line(src, i, y1, x0, y1, x1, y1, x2, y1, x3, np.float32(sx - fx), cubic, ch)
                        else:
                            v = _line(src, i, y0, x1, y1, x1, y2, x1, y3, x1, np.float32(sy - fy), cubic, ch)
                        out[i, y, x, ch] = _to_u8(v)
                else:
                    dx = np.float32(sx - fx)
                    dy = np.float32(sy - fy)
                    if cubic:
                        x0, x3 = _clamp(ix - 1, w - 1), _clamp(ix + 2, w - 1)
                        y0, y3 = _clamp(iy - 1, h - 1), _clamp(iy + 2, h - 1)
                        for ch in range(c):
                            r0 = _interp(_tap(src, i, y0, x0, ch), _tap(src, i, y0, x1, ch), _tap(src, i, y0, x2, ch),
                                         _tap(src, i, y0, x3, ch), dx, True)
                            r1 = _interp(_tap(src, i, y1, x0, ch), _tap(src, i, y1, x1, ch), _tap(src, i, y1, x2, ch),
                                         _tap(src, i, y1, x3, ch), dx, True)
                            r2 = _interp(_tap(src, i, y2, x0, ch), _tap(src, i, y2, x1, ch), _tap(src, i, y2, x2, ch),
                                         _tap(src, i, y2, x3, ch), dx, True)
                            r3 = _interp(_tap(src, i, y3, x0, ch), _tap(src, i, y3, x1, ch), _tap(src, i, y3, x2, ch),
                                         _tap(src, i, y3, x3, ch), dx, True)
                            out[i, y, x, ch] = _to_u8(_interp(r0, r1, r2, r3, dy, True))
                    else:
                        for ch in range(c):
                            v1 = _tap(src, i, y1, x1, ch)
                            r1 = v1 + dx * (_tap(src, i, y1, x2, ch) - v1)
                            v2 = _tap(src, i, y2, x1, ch)
                            r2 = v2 + dx * (_tap(src, i, y2, x2, ch) - v2)
                            out[i, y, x, ch] = _to_u8(r1 + dy * (r2 - r1))


@_njit()
def _lut_rows(src, lut, out, start, stop, step):
    # row views and the three channels written out: numba indexes a 4-d array three times slower
    _, h, w, _ = src.shape
    for i in range(start, stop, step):  # whole images: a thread's pages are its own
        for y in range(h):
            s, o = src[i, y], out[i, y]
            l0, l1, l2 = lut[i, 0], lut[i, 1], lut[i, 2]
            for x in range(w):
                o[x, 0] = l0[s[x, 0]]
                o[x, 1] = l1[s[x, 1]]
                o[x, 2] = l2[s[x, 2]]


@_njit()
def _hist_rows(src, hist, start, stop, step):
    _, h, w, _ = src.shape
    for i in range(start, stop, step):  # whole images: each owns its counts
        h0, h1, h2 = hist[i, 0], hist[i, 1], hist[i, 2]
        for y in range(h):
            s = src[i, y]
            for x in range(w):
                h0[s[x, 0]] += 1
                h1[s[x, 1]] += 1
                h2[s[x, 2]] += 1


@_njit(inline="always")
def _gray(src, i, y, x):
    # PIL's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point, rounded
    return (np.int32(src[i, y, x, 0]) * 19595 + np.int32(src[i, y, x, 1]) * 38470
            + np.int32(src[i, y, x, 2]) * 7471 + 0x8000) >> 16


@_njit(inline="always")
def _blend_u8(f, v, deg):
    # PIL's blend: deg + f (v - deg), the product and the sum each rounded to float32; clamped, truncated
    return _to_u8(f * np.float32(v - deg) + np.float32(deg))


@_njit(inline="always")
def _smooth(above, row, below, x, ch):
    # PIL's SMOOTH filter at an interior pixel: weights 1 around a centre of 5, divided by 13, rounded
    total = (np.int32(above[x - 1, ch]) + np.int32(above[x, ch]) + np.int32(above[x + 1, ch])
             + np.int32(row[x - 1, ch]) + 5 * np.int32(row[x, ch]) + np.int32(row[x + 1, ch])
             + np.int32(below[x - 1, ch]) + np.int32(below[x, ch]) + np.int32(below[x + 1, ch]))
    smooth = math.floor(np.float32(total) / np.float32(13.0) + np.float32(0.5))
    return np.int32(0 if smooth < 0 else (255 if smooth > 255 else smooth))


@_njit()
def _enhance_rows(src, kinds, factors, out, start, stop, step):
    _, h, w, _ = src.shape
    for i in range(start, stop, step):  # whole images: a thread's pages are its own
        kind = kinds[i]
        f = factors[i]
        for y in range(h):
            row, o = src[i, y], out[i, y]
            if kind == 1:  # Color: a blend with the grey image
                for x in range(w):
                    g = _gray(src, i, y, x)
                    for ch in range(3):
                        o[x, ch] = _blend_u8(f, np.int32(row[x, ch]), g)
            elif kind == 2 and 0 < y < h - 1:  # Sharpness: a blend with the SMOOTH-filtered image
                above, below = src[i, y - 1], src[i, y + 1]
                for ch in range(3):  # the first and last columns keep their pixels
                    o[0, ch] = row[0, ch]
                    o[w - 1, ch] = row[w - 1, ch]
                for x in range(1, w - 1):
                    for ch in range(3):
                        o[x, ch] = _blend_u8(f, np.int32(row[x, ch]), _smooth(above, row, below, x, ch))
            else:  # no blend, or the first and last rows of a Sharpness image: the pixels as they are
                for x in range(w):
                    for ch in range(3):
                        o[x, ch] = row[x, ch]


@_njit()
def _mix_row(own, partner, o, params, y, table, scale, shift):
    """One output row `o` (w * 3,) float32 of mix_normalize: `own` and `partner` the rows of the image and
    its partner, `params` the image's row of `MixupCutmix.pack`."""
    m = o.shape[0]
    if params[1] > 0.5:  # cutmix: the partner's pixels inside the box, the image's own outside
        lo, hi = (int(params[4]), int(params[5])) if params[2] <= y < params[3] else (0, 0)
        n0, n1, n2 = table[0], table[1], table[2]
        for x in range(m // 3):
            p = partner if lo <= x < hi else own
            k = 3 * x
            o[k] = n0[p[k]]
            o[k + 1] = n1[p[k + 1]]
            o[k + 2] = n2[p[k + 2]]
        return
    # torch.lerp(partner, image, lam) as its vectorised CPU kernel computes it, one fused multiply-add
    # either side of 0.5: exact in float64 (small integers times a float32), then rounded once; then
    # torch.addcmul(shift, mixed, scale), also one fused multiply-add (the product is exact in float64,
    # and the float64 sum rounded to float32 gives its result)
    lam = np.float64(np.float32(params[0]))
    if lam < 0.5:
        for k in range(m):
            s = np.float64(partner[k])
            mixed = np.float32(s + lam * (np.float64(own[k]) - s))
            o[k] = np.float32(shift[k] + np.float64(mixed) * scale[k])
    else:
        for k in range(m):
            e = np.float64(own[k])
            mixed = np.float32(e + (lam - 1.0) * (e - np.float64(partner[k])))
            o[k] = np.float32(shift[k] + np.float64(mixed) * scale[k])


@_njit()
def _mix_normalize_rows(src, mix, scale, shift, out, bf16, start, stop, step):
    """src (n, h, w, 3) uint8; out (n, h, w, 3) float32, or bfloat16's bits as uint16 (written from a
    float32 row); scale and shift float64 (w * 3,): the channels' constants repeated along a row."""
    n, h, w, _ = src.shape
    m = w * 3
    row = np.empty(m, dtype=np.float32)
    bits = row.view(np.uint32)
    table = np.empty((3, 256), dtype=np.float32)  # whole grey levels normalised (a cutmix pixel is one)
    for ch in range(3):
        for v in range(256):
            table[ch, v] = np.float32(shift[ch] + np.float64(v) * scale[ch])
    for i in range(start, stop, step):  # whole images: a thread's pages are its own
        for y in range(h):
            own = src[i, y].reshape(m)
            partner = src[n - 1 - i, y].reshape(m)  # the batch flipped
            target = out[i, y].reshape(m)
            if not bf16:
                _mix_row(own, partner, target, mix[i], y, table, scale, shift)
                continue
            _mix_row(own, partner, row, mix[i], y, table, scale, shift)
            for k in range(m):  # float32 -> bfloat16 bits, rounded to nearest even (as torch's .to(torch.bfloat16))
                b = bits[k]
                target[k] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@_njit()
def _put_rows(out, index, keep, rows, start, stop, step):
    for r in range(start, stop, step):
        if keep[r]:
            out[index[r]] = rows[r]


@_njit()
def _grey_sum_rows(src, sums, start, stop, step):
    _, h, w, _ = src.shape
    for i in range(start, stop, step):  # whole images: each owns its sum
        total = 0
        for y in range(h):
            for x in range(w):
                total += _gray(src, i, y, x)
        sums[i] = total


_POOL: dict = {}
_KERNEL_THREADS = 0  # set by `cpu_threads` while torch's own ops run in one thread


@contextmanager
def cpu_threads(device: torch.device):
    """On the CPU, for one augmentation call: torch's own ops in one thread, the fused kernels split across
    torch's thread count. The call's torch ops are small and many; torch runs each one large enough in an
    OpenMP team whose threads spin at its end, and when other processes hold the cores (a loader's workers,
    the demo's timm baseline) a team waits for a descheduled thread at every op. The kernels' own threads only join once
    per kernel."""
    global _KERNEL_THREADS
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1 or _KERNEL_THREADS:
        yield
        return
    _KERNEL_THREADS = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _KERNEL_THREADS = 0


def _run_images(kernel, images: int, *args) -> None:
    """kernel(*args, start, stop, step) over `images`, split across torch's thread count. Thread k takes
    images k, k + threads, ...: a stage's listed images come first and its pad rows (no work) last, so
    contiguous blocks would leave a thread idle, and whole images keep each thread's writes on pages of
    its own (two threads faulting in the same fresh pages wait on each other)."""
    threads = max(1, min(_KERNEL_THREADS or torch.get_num_threads(), images))
    if threads == 1:
        kernel(*args, 0, images, 1)
        return
    pool = _POOL.get((os.getpid(), threads))
    if pool is None:  # one pool per process (a forked child makes its own) and thread count
        pool = _POOL[(os.getpid(), threads)] = ThreadPoolExecutor(threads, thread_name_prefix="fastrsb-aug")
    for f in [pool.submit(kernel, *args, k, images, threads) for k in range(threads)]:
        f.result()


def _nhwc(t: Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def _warp_cpu(x: Tensor, mats: Tensor, cubic: Tensor, axes: Tensor, active: Tensor, fill: Tensor,
              interpolation: int) -> Tensor:
    n, c, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8, memory_format=torch.channels_last)
    if n:
        _run_images(_warp_rows, n, _nhwc(x), mats.numpy(), cubic.numpy(), axes.numpy(), active.numpy(),
                  fill.numpy(), interpolation == NEAREST, _nhwc(out))
    return out


def _lut_cpu(x: Tensor, lut: Tensor) -> Tensor:
    n, _, h, _ = x.shape
    out = torch.empty_like(x)  # x's memory format
    if n:
        _run_images(_lut_rows, n, _nhwc(x), lut.numpy(), _nhwc(out))
    return out


def _hist_cpu(x: Tensor) -> Tensor:
    n = x.shape[0]
    hist = torch.zeros((n, 3, 256), dtype=torch.int32)
    if n:
        _run_images(_hist_rows, n, _nhwc(x), hist.numpy())
    return hist


def _enhance_cpu(x: Tensor, kinds: Tensor, factors: Tensor) -> Tensor:
    n, _, h, _ = x.shape
    out = torch.empty_like(x)
    if n:
        _run_images(_enhance_rows, n, _nhwc(x), kinds.numpy(), factors.numpy(), _nhwc(out))
    return out


def _mix_normalize_cpu(x: Tensor, mix: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    n, c, h, w = x.shape
    native = dtype in (torch.float32, torch.bfloat16)
    out = torch.empty((n, c, h, w), dtype=dtype if native else torch.float32, memory_format=torch.channels_last)
    if n:
        target = _nhwc(out.view(torch.uint16) if dtype == torch.bfloat16 else out)
        along_row = np.tile(np.stack([scale.numpy(), shift.numpy()]).astype(np.float64), (1, w))  # (2, w * 3)
        _run_images(_mix_normalize_rows, n, _nhwc(x.contiguous(memory_format=torch.channels_last)), mix.numpy(),
                  along_row[0], along_row[1], target, dtype == torch.bfloat16)
    return out if native else out.to(dtype)


def _put_rows_cpu(out: Tensor, index: Tensor, keep: Tensor, rows: Tensor) -> None:
    if rows.shape[0]:
        _run_images(_put_rows, rows.shape[0], _nhwc(out), index.numpy(), keep.numpy(), _nhwc(rows))


def _grey_mean_cpu(x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    sums = torch.zeros(n, dtype=torch.int64)
    if n:
        _run_images(_grey_sum_rows, n, _nhwc(x), sums.numpy())
    return sums.double() / (h * w)  # torch's mean: the exact sum, divided once


# ---------------------------------------------------------------------------------------------- CUDA

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build: the CPU kernels serve
    triton = None


def _triton_kernels():
    if triton is None:
        raise ImportError("fastrsb's CUDA augmentation kernels need triton (it comes with torch's CUDA builds)")
    return {"warp": _warp_kernel, "lut": _lut_kernel, "hist": _hist_kernel, "enhance": _enhance_kernel,
            "mix_normalize": _mix_normalize_kernel, "put_rows": _put_rows_kernel, "grey_sum": _grey_sum_kernel,
            "cdiv": triton.cdiv}


if triton is not None:

    @triton.jit
    def _tl_interp(v1, v2, v3, v4, d, cubic):
        p3 = 2.0 * (v1 - v2) + v3 - v4
        p4 = v2 - v1 - v3 + v4
        return tl.where(cubic, v2 + d * ((v3 - v1) + d * (p3 + d * p4)), v2 + d * (v3 - v2))

    @triton.jit
    def _tl_tap(base, yy, xx, s_h, s_w, mask):
        return tl.load(base + yy * s_h + xx * s_w, mask=mask, other=0).to(tl.float32)

    @triton.jit
    def _warp_kernel(src, out, mats, cubic_flags, active, fill, h, w, s_n, s_h, s_w, s_c, o_n, o_h, o_w, o_c,
                    NEAREST_: tl.constexpr, BLOCK: tl.constexpr):
        # every image gets the 2-d interpolation: for a one-axis map it gives the 1-d result bit for bit
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = (offs < h * w) & (tl.load(active + i) != 0)  # an inactive image is left as it is
        y = offs // w
        x = offs - y * w
        a0 = tl.load(mats + i * 6)
        a1 = tl.load(mats + i * 6 + 1)
        a2 = tl.load(mats + i * 6 + 2)
        a3 = tl.load(mats + i * 6 + 3)
        a4 = tl.load(mats + i * 6 + 4)
        a5 = tl.load(mats + i * 6 + 5)
        cx = x.to(tl.float64) + 0.5
        cy = y.to(tl.float64) + 0.5
        sx = a0 * cx + a1 * cy + a2 - 0.5
        sy = a3 * cx + a4 * cy + a5 - 0.5
        inside = (sx >= -0.5) & (sy >= -0.5) & (sx < w - 0.5) & (sy < h - 0.5)
        load = valid & inside
        cubic = tl.load(cubic_flags + i) != 0
        src_i = src + i * s_n
        out_i = out + i * o_n + y * o_h + x * o_w
        if NEAREST_:
            px = tl.minimum(tl.maximum(tl.floor(sx + 0.5).to(tl.int32), 0), w - 1)
            py = tl.minimum(tl.maximum(tl.floor(sy + 0.5).to(tl.int32), 0), h - 1)
            for ch in tl.static_range(3):
                v = tl.load(src_i + ch * s_c + py * s_h + px * s_w, mask=load, other=0)
                v = tl.where(inside, v, tl.load(fill + ch))
                tl.store(out_i + ch * o_c, v, mask=valid)
        else:
            fx = tl.floor(sx)
            fy = tl.floor(sy)
            dx = (sx - fx).to(tl.float32)
            dy = (sy - fy).to(tl.float32)
            ix = fx.to(tl.int32)
            iy = fy.to(tl.int32)
            x0 = tl.minimum(tl.maximum(ix - 1, 0), w - 1)
            x1 = tl.minimum(tl.maximum(ix, 0), w - 1)
            x2 = tl.minimum(tl.maximum(ix + 1, 0), w - 1)
            x3 = tl.minimum(tl.maximum(ix + 2, 0), w - 1)
            y0 = tl.minimum(tl.maximum(iy - 1, 0), h - 1)
            y1 = tl.minimum(tl.maximum(iy, 0), h - 1)
            y2 = tl.minimum(tl.maximum(iy + 1, 0), h - 1)
            y3 = tl.minimum(tl.maximum(iy + 2, 0), h - 1)
            for ch in tl.static_range(3):
                base = src_i + ch * s_c
                r0 = _tl_interp(_tl_tap(base, y0, x0, s_h, s_w, load), _tl_tap(base, y0, x1, s_h, s_w, load),
                            _tl_tap(base, y0, x2, s_h, s_w, load), _tl_tap(base, y0, x3, s_h, s_w, load), dx, cubic)
                r1 = _tl_interp(_tl_tap(base, y1, x0, s_h, s_w, load), _tl_tap(base, y1, x1, s_h, s_w, load),
                            _tl_tap(base, y1, x2, s_h, s_w, load), _tl_tap(base, y1, x3, s_h, s_w, load), dx, cubic)
                r2 = _tl_interp(_tl_tap(base, y2, x0, s_h, s_w, load), _tl_tap(base, y2, x1, s_h, s_w, load),
                            _tl_tap(base, y2, x2, s_h, s_w, load), _tl_tap(base, y2, x3, s_h, s_w, load), dx, cubic)
                r3 = _tl_interp(_tl_tap(base, y3, x0, s_h, s_w, load), _tl_tap(base, y3, x1, s_h, s_w, load),
                            _tl_tap(base, y3, x2, s_h, s_w, load), _tl_tap(base, y3, x3, s_h, s_w, load), dx, cubic)
                v = _tl_interp(r0, r1, r2, r3, dy, cubic)
                v = tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.uint8)  # clamp, then truncate
                v = tl.where(inside, v, tl.load(fill + ch))
                tl.store(out_i + ch * o_c, v, mask=valid)

    @triton.jit
    def _lut_kernel(src, lut, out, h, w, s_n, s_h, s_w, s_c, o_n, o_h, o_w, o_c, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < h * w
        y = offs // w
        x = offs - y * w
        for ch in tl.static_range(3):
            v = tl.load(src + i * s_n + ch * s_c + y * s_h + x * s_w, mask=valid, other=0).to(tl.int32)
            mapped = tl.load(lut + (i * 3 + ch) * 256 + v, mask=valid, other=0)
            tl.store(out + i * o_n + ch * o_c + y * o_h + x * o_w, mapped, mask=valid)

    @triton.jit
    def _hist_kernel(src, hist, h, w, s_n, s_h, s_w, s_c, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < h * w
        y = offs // w
        x = offs - y * w
        for ch in tl.static_range(3):
            v = tl.load(src + i * s_n + ch * s_c + y * s_h + x * s_w, mask=valid, other=0).to(tl.int32)
            tl.atomic_add(hist + (i * 3 + ch) * 256 + v, 1, mask=valid)

    @triton.jit
    def _enhance_kernel(src, kinds, factors, out, h, w, s_n, s_h, s_w, s_c, o_n, o_h, o_w, o_c,
                       BLOCK: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < h * w
        y = offs // w
        x = offs - y * w
        kind = tl.load(kinds + i).to(tl.int32)
        f = tl.load(factors + i)
        src_i = src + i * s_n
        r = tl.load(src_i + y * s_h + x * s_w, mask=valid, other=0).to(tl.int32)
        g = tl.load(src_i + s_c + y * s_h + x * s_w, mask=valid, other=0).to(tl.int32)
        b = tl.load(src_i + 2 * s_c + y * s_h + x * s_w, mask=valid, other=0).to(tl.int32)
        gray = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
        interior = (y > 0) & (y < h - 1) & (x > 0) & (x < w - 1)
        for ch in tl.static_range(3):
            base = src_i + ch * s_c
            v = tl.load(base + y * s_h + x * s_w, mask=valid, other=0).to(tl.int32)
            near = valid & interior & (kind == 2)
            total = 4 * v
            for dy in tl.static_range(3):
                for dx in tl.static_range(3):
                    total += tl.load(base + (y + dy - 1) * s_h + (x + dx - 1) * s_w, mask=near, other=0).to(tl.int32)
            smooth = tl.floor(total.to(tl.float32) / 13.0 + 0.5)
            smooth = tl.minimum(tl.maximum(smooth, 0.0), 255.0).to(tl.int32)
            deg = tl.where(kind == 1, gray, tl.where(near, smooth, v))
            d = deg.to(tl.float32)
            product = f * (v - deg).to(tl.float32)
            mixed = tl.minimum(tl.maximum(product + d, 0.0), 255.0).to(tl.uint8)
            tl.store(out + i * o_n + ch * o_c + y * o_h + x * o_w, mixed, mask=valid)


    @triton.jit
    def _mix_normalize_kernel(src, mix, scale, shift, out, n, h, w, s_n, s_h, s_w, s_c, o_n, o_h, o_w, o_c,
                              BLOCK: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < h * w
        y = offs // w
        x = offs - y * w
        j = n - 1 - i
        lam = tl.load(mix + i * 6).to(tl.float32)
        cut = tl.load(mix + i * 6 + 1) > 0.5
        yf = y.to(tl.float64)
        xf = x.to(tl.float64)
        in_box = (tl.load(mix + i * 6 + 2) <= yf) & (yf < tl.load(mix + i * 6 + 3)) & \
            (tl.load(mix + i * 6 + 4) <= xf) & (xf < tl.load(mix + i * 6 + 5))
        weight = tl.where(cut, tl.where(in_box, 0.0, 1.0), lam)
        for ch in tl.static_range(3):
            s = tl.load(src + j * s_n + ch * s_c + y * s_h + x * s_w, mask=valid, other=0).to(tl.float32)
            e = tl.load(src + i * s_n + ch * s_c + y * s_h + x * s_w, mask=valid, other=0).to(tl.float32)
            # torch.lerp's formula, one fused multiply-add either side of 0.5, then addcmul's
            mixed = tl.where(weight < 0.5, tl.fma(weight, e - s, s), tl.fma(weight - 1.0, e - s, e))
            v = tl.fma(mixed, tl.load(scale + ch), tl.load(shift + ch))
            tl.store(out + i * o_n + ch * o_c + y * o_h + x * o_w, v.to(out.dtype.element_ty), mask=valid)

    @triton.jit
    def _put_rows_kernel(out, index, keep, rows, h, w, s_n, s_h, s_w, s_c, r_n, r_h, r_w, r_c, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = (offs < h * w) & (tl.load(keep + r) != 0)
        y = offs // w
        x = offs - y * w
        k = tl.load(index + r)
        for ch in tl.static_range(3):
            v = tl.load(rows + r * r_n + ch * r_c + y * r_h + x * r_w, mask=valid, other=0)
            tl.store(out + k * s_n + ch * s_c + y * s_h + x * s_w, v, mask=valid)

    @triton.jit
    def _grey_sum_kernel(src, sums, h, w, s_n, s_h, s_w, s_c, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < h * w
        y = offs // w
        x = offs - y * w
        base = src + i * s_n + y * s_h + x * s_w
        r = tl.load(base, mask=valid, other=0).to(tl.int32)
        g = tl.load(base + s_c, mask=valid, other=0).to(tl.int32)
        b = tl.load(base + 2 * s_c, mask=valid, other=0).to(tl.int32)
        gray = tl.where(valid, (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16, 0)
        tl.atomic_add(sums + i, tl.sum(gray.to(tl.int64), axis=0))

BLOCK = 256


def _launch_warp(x: Tensor, mats: Tensor, cubic: Tensor, active: Tensor, fill: Tensor, interpolation: int) -> Tensor:
    n, c, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
    if n:
        k = _triton_kernels()
        k["warp"][(n, k["cdiv"](h * w, BLOCK))](
            x, out, mats.contiguous(), cubic.contiguous(), active.contiguous(), fill.contiguous(), h, w, *_nchw_strides(x), *_nchw_strides(out),
            NEAREST_=interpolation == NEAREST, BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def _launch_lut(x: Tensor, lut: Tensor) -> Tensor:
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    if n:
        k = _triton_kernels()
        k["lut"][(n, k["cdiv"](h * w, BLOCK))](x, lut.contiguous(), out, h, w, *_nchw_strides(x),
                                               *_nchw_strides(out), BLOCK=BLOCK)
    return out


def _launch_hist(x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    hist = torch.zeros((n, 3, 256), dtype=torch.int32, device=x.device)
    if n:
        k = _triton_kernels()
        k["hist"][(n, k["cdiv"](h * w, BLOCK))](x, hist, h, w, *_nchw_strides(x), BLOCK=BLOCK)
    return hist


def _launch_enhance(x: Tensor, kinds: Tensor, factors: Tensor) -> Tensor:
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    if n:
        k = _triton_kernels()
        k["enhance"][(n, k["cdiv"](h * w, BLOCK))](x, kinds.contiguous(), factors.contiguous(), out, h, w,
                                                   *_nchw_strides(x), *_nchw_strides(out), BLOCK=BLOCK,
                                                   enable_fp_fusion=False)
    return out


def _launch_mix_normalize(x: Tensor, mix: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    n, c, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=dtype, device=x.device, memory_format=torch.channels_last)
    if n:
        k = _triton_kernels()
        k["mix_normalize"][(n, k["cdiv"](h * w, BLOCK))](
            x, mix.contiguous(), scale.contiguous(), shift.contiguous(), out, n, h, w, *_nchw_strides(x),
            *_nchw_strides(out), BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def _launch_put_rows(out: Tensor, index: Tensor, keep: Tensor, rows: Tensor) -> None:
    n, _, h, w = rows.shape
    if n:
        k = _triton_kernels()
        k["put_rows"][(n, k["cdiv"](h * w, BLOCK))](out, index.contiguous(), keep.contiguous(), rows, h, w,
                                                    *_nchw_strides(out), *_nchw_strides(rows), BLOCK=BLOCK)


def _launch_grey_mean(x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    sums = torch.zeros(n, dtype=torch.int64, device=x.device)
    if n:
        k = _triton_kernels()
        k["grey_sum"][(n, k["cdiv"](h * w, BLOCK))](x, sums, h, w, *_nchw_strides(x), BLOCK=BLOCK)
    return sums.double() / (h * w)


def _nchw_strides(t: Tensor) -> tuple[int, int, int, int]:
    """(image, row, column, channel) strides in elements of an NCHW tensor."""
    s_n, s_c, s_h, s_w = t.stride()
    return s_n, s_h, s_w, s_c


# ---------------------------------------------------------------------------------------------- the ops

def _check_warp(x, mats, cubic, axes, active, fill):
    n = x.shape[0]
    torch._check(x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, lambda: "warp: uint8 (n, 3, h, w)")
    torch._check(mats.dtype == torch.float64 and tuple(mats.shape) == (n, 6), lambda: "warp: mats float64 (n, 6)")
    torch._check(cubic.dtype == torch.bool and tuple(cubic.shape) == (n,), lambda: "warp: cubic bool (n,)")
    torch._check(axes.dtype == torch.int8 and tuple(axes.shape) == (n,), lambda: "warp: axes int8 (n,)")
    torch._check(active.dtype == torch.bool and tuple(active.shape) == (n,), lambda: "warp: active bool (n,)")
    torch._check(fill.dtype == torch.uint8 and tuple(fill.shape) == (3,), lambda: "warp: fill uint8 (3,)")


@torch.library.custom_op("fastrsb::warp_affine", mutates_args=())
def warp_affine(x: Tensor, mats: Tensor, cubic: Tensor, axes: Tensor, active: Tensor, fill: Tensor,
                interpolation: int) -> Tensor:
    """PIL's Image.transform(AFFINE) of each uint8 image (n, 3, h, w) by its map `mats` (n, 6) float64
    (source = A @ (x, y, 1) at pixel centres): `cubic` (n,) bool picks bicubic per image when
    `interpolation` is RANDOM (BICUBIC: every image, BILINEAR: none; NEAREST ignores it); `axes` (n,)
    int8 says which maps move pixels along one axis only (AXIS_X, AXIS_Y: the 1-d interpolation, equal
    bit for bit), `fill` (3,) uint8 is the colour outside the source. -> uint8, channels_last; the
    images where `active` (n,) is False are not computed (their pixels are undefined: a caller that
    passes False throws them away)."""
    raise NotImplementedError(f"fastrsb::warp_affine has no kernel for {x.device.type} tensors (CPU and CUDA only)")


@warp_affine.register_fake
def _(x, mats, cubic, axes, active, fill, interpolation):
    _check_warp(x, mats, cubic, axes, active, fill)
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)


@warp_affine.register_kernel("cpu")
def _(x, mats, cubic, axes, active, fill, interpolation):
    _check_warp(x, mats, cubic, axes, active, fill)
    if interpolation == BICUBIC:
        cubic = torch.ones_like(cubic)
    elif interpolation != RANDOM:
        cubic = torch.zeros_like(cubic)
    return _warp_cpu(x, mats, cubic, axes, active, fill, interpolation)


@warp_affine.register_kernel("cuda")
def _(x, mats, cubic, axes, active, fill, interpolation):
    _check_warp(x, mats, cubic, axes, active, fill)
    if interpolation == BICUBIC:
        cubic = torch.ones_like(cubic)
    elif interpolation != RANDOM:
        cubic = torch.zeros_like(cubic)
    return _launch_warp(x, mats, cubic, active, fill, interpolation)


@torch.library.custom_op("fastrsb::apply_lut", mutates_args=())
def apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """out[i, c, y, x] = lut[i, c, x[i, c, y, x]] for uint8 images (n, 3, h, w) and tables (n, 3, 256)
    uint8; the result has x's memory format."""
    raise NotImplementedError(f"fastrsb::apply_lut has no kernel for {x.device.type} tensors (CPU and CUDA only)")


def _check_lut(x, lut):
    torch._check(x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, lambda: "lut: uint8 (n, 3, h, w)")
    torch._check(lut.dtype == torch.uint8 and tuple(lut.shape) == (x.shape[0], 3, 256),
                 lambda: "lut: tables uint8 (n, 3, 256)")


@apply_lut.register_fake
def _(x, lut):
    _check_lut(x, lut)
    return torch.empty_like(x)


@apply_lut.register_kernel("cpu")
def _(x, lut):
    _check_lut(x, lut)
    return _lut_cpu(x, lut.contiguous())


@apply_lut.register_kernel("cuda")
def _(x, lut):
    _check_lut(x, lut)
    return _launch_lut(x, lut)


@torch.library.custom_op("fastrsb::histogram", mutates_args=())
def histogram(x: Tensor) -> Tensor:
    """(n, 3, 256) int32 pixel counts of each uint8 image (n, 3, h, w) and channel."""
    raise NotImplementedError(f"fastrsb::histogram has no kernel for {x.device.type} tensors (CPU and CUDA only)")


def _check_hist(x):
    torch._check(x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, lambda: "histogram: uint8 (n, 3, h, w)")


@histogram.register_fake
def _(x):
    _check_hist(x)
    return torch.empty((x.shape[0], 3, 256), dtype=torch.int32, device=x.device)


@histogram.register_kernel("cpu")
def _(x):
    _check_hist(x)
    return _hist_cpu(x)


@histogram.register_kernel("cuda")
def _(x):
    _check_hist(x)
    return _launch_hist(x)


ENHANCE_NONE, ENHANCE_COLOR, ENHANCE_SHARPNESS = range(3)


@torch.library.custom_op("fastrsb::enhance", mutates_args=())
def enhance(x: Tensor, kinds: Tensor, factors: Tensor) -> Tensor:
    """PIL's ImageEnhance.Color (kind 1) and Sharpness (kind 2) of each uint8 image (n, 3, h, w) at its
    float32 factor: Image.blend(degenerate, image, factor), with the grey image (PIL's fixed-point luma)
    or the SMOOTH-filtered image (its one-pixel border unfiltered) as the degenerate one; kind 0 keeps
    the image. `kinds` (n,) int8, `factors` (n,) float32; the result has x's memory format."""
    raise NotImplementedError(f"fastrsb::enhance has no kernel for {x.device.type} tensors (CPU and CUDA only)")


def _check_enhance(x, kinds, factors):
    n = x.shape[0]
    torch._check(x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, lambda: "enhance: uint8 (n, 3, h, w)")
    torch._check(kinds.dtype == torch.int8 and tuple(kinds.shape) == (n,), lambda: "enhance: kinds int8 (n,)")
    torch._check(factors.dtype == torch.float32 and tuple(factors.shape) == (n,),
                 lambda: "enhance: factors float32 (n,)")


@enhance.register_fake
def _(x, kinds, factors):
    _check_enhance(x, kinds, factors)
    return torch.empty_like(x)


@enhance.register_kernel("cpu")
def _(x, kinds, factors):
    _check_enhance(x, kinds, factors)
    return _enhance_cpu(x, kinds.contiguous(), factors.contiguous())


@enhance.register_kernel("cuda")
def _(x, kinds, factors):
    _check_enhance(x, kinds, factors)
    return _launch_enhance(x, kinds, factors)


@torch.library.custom_op("fastrsb::mix_normalize", mutates_args=())
def mix_normalize(x: Tensor, mix: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """Mixup/CutMix and normalisation of uint8 images (n, 3, h, w) in one pass: image i mixed with image
    n-1-i by its row of `mix` (n, 6) float64 (lam, use_cutmix, yl, yh, xl, xh: `MixupCutmix.pack`), as
    `torch.lerp(partner, image, weight)` with weight lam (float32), or 0 inside the box and 1 outside;
    then `mixed * scale + shift` per channel (`scale`, `shift` (3,) float32), as `torch.addcmul`, in
    `dtype`, channels_last. Each of the two is one fused multiply-add, as torch's CPU kernels round them."""
    raise NotImplementedError(f"fastrsb::mix_normalize has no kernel for {x.device.type} tensors (CPU and CUDA only)")


def _check_mix(x, mix, scale, shift, dtype):
    n = x.shape[0]
    torch._check(x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, lambda: "mix: uint8 (n, 3, h, w)")
    torch._check(mix.dtype == torch.float64 and tuple(mix.shape) == (n, 6), lambda: "mix: params float64 (n, 6)")
    torch._check(scale.dtype == torch.float32 and scale.numel() == 3 and shift.dtype == torch.float32
                 and shift.numel() == 3, lambda: "mix: scale and shift float32 (3,)")
    torch._check(dtype.is_floating_point, lambda: "mix: a floating-point dtype")


@mix_normalize.register_fake
def _(x, mix, scale, shift, dtype):
    _check_mix(x, mix, scale, shift, dtype)
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)


@mix_normalize.register_kernel("cpu")
def _(x, mix, scale, shift, dtype):
    _check_mix(x, mix, scale, shift, dtype)
    return _mix_normalize_cpu(x, mix.contiguous(), scale.reshape(3).contiguous(), shift.reshape(3).contiguous(), dtype)


@mix_normalize.register_kernel("cuda")
def _(x, mix, scale, shift, dtype):
    _check_mix(x, mix, scale, shift, dtype)
    return _launch_mix_normalize(x, mix, scale.reshape(3), shift.reshape(3), dtype)


@torch.library.custom_op("fastrsb::put_rows_", mutates_args=("out",))
def put_rows_(out: Tensor, index: Tensor, keep: Tensor, rows: Tensor) -> None:
    """out[index[r]] = rows[r] for the rows r where keep[r], in place: uint8 images (m, 3, h, w) and
    (n, 3, h, w), index (n,) int64, keep (n,) bool. The kept indices must be distinct (a stage's list
    names each member once; its pad rows are not kept)."""
    raise NotImplementedError(f"fastrsb::put_rows_ has no kernel for {out.device.type} tensors (CPU and CUDA only)")


def _check_put(out, index, keep, rows):
    n = rows.shape[0]
    torch._check(out.dtype == torch.uint8 and rows.dtype == torch.uint8 and out.dim() == 4 and rows.dim() == 4
                 and out.shape[1:] == rows.shape[1:] and rows.shape[1] == 3, lambda: "put_rows: uint8 images alike")
    torch._check(index.dtype == torch.int64 and tuple(index.shape) == (n,), lambda: "put_rows: index int64 (n,)")
    torch._check(keep.dtype == torch.bool and tuple(keep.shape) == (n,), lambda: "put_rows: keep bool (n,)")


@put_rows_.register_fake
def _(out, index, keep, rows):
    _check_put(out, index, keep, rows)


@put_rows_.register_kernel("cpu")
def _(out, index, keep, rows):
    _check_put(out, index, keep, rows)
    _put_rows_cpu(out, index.contiguous(), keep.contiguous(), rows)


@put_rows_.register_kernel("cuda")
def _(out, index, keep, rows):
    _check_put(out, index, keep, rows)
    _launch_put_rows(out, index, keep, rows)


@torch.library.custom_op("fastrsb::grey_mean", mutates_args=())
def grey_mean(x: Tensor) -> Tensor:
    """(n,) float64: the mean of PIL's grey levels (RGB -> L, fixed point) of each uint8 image (n, 3, h, w),
    as torch's mean computes it (the exact sum divided by the pixel count)."""
    raise NotImplementedError(f"fastrsb::grey_mean has no kernel for {x.device.type} tensors (CPU and CUDA only)")


@grey_mean.register_fake
def _(x):
    _check_hist(x)
    return torch.empty((x.shape[0],), dtype=torch.float64, device=x.device)


@grey_mean.register_kernel("cpu")
def _(x):
    _check_hist(x)
    return _grey_mean_cpu(x)


@grey_mean.register_kernel("cuda")
def _(x):
    _check_hist(x)
    return _launch_grey_mean(x)
