"""The augmentation's fused kernels (fastrsb/augment/kernels.py) against their torch-op definitions in ops.py
and mixup.py: the same bytes, for every interpolation, map, memory format and dtype; the CUDA (Triton)
kernels run on the CPU in Triton's interpreter."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastrsb.augment as fa
from fastrsb.augment import kernels, ops
from fastrsb.augment.pipeline import _normalize_constants

from conftest import REPO

MAPS = {"rotate": (ops._rotate, kernels.AXIS_2D), "shear_x": (ops._shear_x, kernels.AXIS_X),
        "shear_y": (ops._shear_y, kernels.AXIS_Y), "translate_x": (ops._translate_x_rel, kernels.AXIS_X),
        "translate_y": (ops._translate_y_rel, kernels.AXIS_Y)}


def images(n, h, w, seed=0, channels_last=True):
    """Smooth fields plus noise and a few flat patches (exact taps, saturated sums)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 300 - 20
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    x = (x + torch.randn(x.shape, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    x[:, :, : h // 3, : w // 3] = 255
    x[0] = 0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def random_maps(n, h, w, rng, kinds=tuple(MAPS)):
    """(mats (n, 6), axes (n,) int8): each image a map of `kinds` at a random magnitude, beyond RandAugment's
    range too (large shears and shifts push points outside the source, where the fill goes)."""
    mats, axes = np.zeros((n, 6)), np.zeros(n, dtype=np.int8)
    for i in range(n):
        name = kinds[rng.integers(len(kinds))]
        make, axis = MAPS[name]
        mats[i] = make(rng.uniform(-25, 25), h, w, 0.45)
        axes[i] = axis
    return torch.from_numpy(mats), torch.from_numpy(axes)


FILL = torch.tensor([124, 116, 104], dtype=torch.uint8)


def ALL(n):
    return torch.ones(n, dtype=torch.bool)


@pytest.mark.parametrize("interpolation", ["random", "bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("shape", [(24, 160, 160), (17, 37, 53), (6, 1, 9), (5, 2, 2)])
def test_warp_equals_its_definition(interpolation, shape):
    n, h, w = shape
    rng = np.random.default_rng(n * h + w)
    consts = ops.device_constants("cpu", h, w, (124, 116, 104))
    mats, axes = random_maps(n, h, w, rng)
    cubic = torch.from_numpy(rng.random(n) < 0.5)
    for channels_last in (True, False):
        x = images(n, h, w, seed=h, channels_last=channels_last)
        ref = ops.warp_reference(x, mats.view(n, 2, 3), consts, interpolation,
                                 cubic if interpolation == "random" else None)
        got = kernels.warp_affine(x, mats, cubic, axes, ALL(n), FILL, kernels.MODES[interpolation])
        assert torch.equal(ref, got), (interpolation, shape, channels_last)
        assert got.is_contiguous(memory_format=torch.channels_last)
    if h > 2:  # the images are not left alone: maps moved pixels, and the fill shows
        assert (got != x).float().mean() > 0.3 and (got == FILL.view(1, 3, 1, 1)).all(dim=1).any()


def test_one_axis_warp_is_the_two_axis_warp_bit_for_bit():
    """The 1-d interpolation along the axis a shear or translation moves equals the 2-d one (whose other
    fraction is exactly 0), so the kernel may take a quarter of the taps."""
    n, h, w = 32, 48, 40
    rng = np.random.default_rng(3)
    mats, axes = random_maps(n, h, w, rng, kinds=("shear_x", "shear_y", "translate_x", "translate_y"))
    assert set(axes.tolist()) == {kernels.AXIS_X, kernels.AXIS_Y}
    cubic = torch.from_numpy(rng.random(n) < 0.5)
    x = images(n, h, w, seed=4)
    one_axis = kernels.warp_affine(x, mats, cubic, axes, ALL(n), FILL, kernels.RANDOM)
    two_axes = kernels.warp_affine(x, mats, cubic, torch.zeros_like(axes), ALL(n), FILL, kernels.RANDOM)
    assert torch.equal(one_axis, two_axes)
    # and a one-axis flag on a rotation would be wrong: the flag matters
    rot, _ = random_maps(n, h, w, rng, kinds=("rotate",))
    assert not torch.equal(kernels.warp_affine(x, rot, cubic, axes, ALL(n), FILL, kernels.RANDOM),
                           kernels.warp_affine(x, rot, cubic, torch.zeros_like(axes), ALL(n), FILL, kernels.RANDOM))


@pytest.mark.parametrize("channels_last", [True, False])
def test_lut_histogram_and_enhance_equal_their_definitions(channels_last):
    rng = np.random.default_rng(5)
    for n, h, w in [(33, 17, 29), (12, 160, 160), (4, 2, 3)]:
        x = images(n, h, w, seed=w, channels_last=channels_last)
        consts = ops.device_constants("cpu", h, w, (124, 116, 104))
        lut = torch.from_numpy(rng.integers(0, 256, (n, 3, 256)).astype(np.uint8))
        got = kernels.apply_lut(x, lut)
        assert torch.equal(ops.apply_lut_reference(x, lut), got)
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(ops.histogram_reference(x), kernels.histogram(x).long())
        assert int(kernels.histogram(x).sum()) == n * 3 * h * w
        assert torch.equal(ops.grey_mean_reference(x, consts), kernels.grey_mean(x))
        kind = torch.from_numpy(rng.integers(0, 3, n)).double()
        factor = torch.from_numpy(rng.uniform(0.1, 1.9, n))
        factor[:4] = torch.tensor([1.72, 0.1, 1.9, 1.0])  # factors where PIL's float32 roundings bite
        got = kernels.enhance(x, kind.to(torch.int8), factor.float())
        assert torch.equal(ops.enhance_reference(x, kind, factor, consts), got), (n, h, w)
        if h > 2:
            assert (got != x).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mix_normalize_equals_mixup_then_normalize(dtype, mode):
    mix = fa.MixupCutmix(0.8, 1.0, prob=0.9, mode=mode, num_classes=10)
    scale, shift = _normalize_constants(torch.device("cpu"), fa.IMAGENET_DEFAULT_MEAN, fa.IMAGENET_DEFAULT_STD)
    cut = set()
    for seed in range(8):
        n, h, w = 10, 23, 31
        x = images(n, h, w, seed=seed)
        params = mix.sample_params(n, h, w, torch.Generator().manual_seed(seed))
        cut.add(bool(params["use_cutmix"][0]))
        packed = torch.from_numpy(mix.pack(params))
        mixed, _ = mix.apply_packed(x, torch.arange(n), packed)
        got = kernels.mix_normalize(x, packed, scale, shift, dtype)
        assert torch.equal(fa.normalize(mixed, dtype=dtype), got), (seed, dtype)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert cut == {True, False} or mode != "batch"


def test_put_rows_writes_the_kept_rows_in_place():
    out = images(12, 9, 14, seed=1)
    rows = images(5, 9, 14, seed=2)
    index = torch.tensor([7, 2, 11, 0, 2])  # the last row repeats image 2 but is not kept
    keep = torch.tensor([True, True, False, True, False])
    expected = out.clone()
    for r in range(5):
        if keep[r]:
            expected[index[r]] = rows[r]
    before = out.data_ptr()
    kernels.put_rows_(out, index, keep, rows)
    assert torch.equal(out, expected) and out.data_ptr() == before
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_kernels_split_across_threads_give_the_same_bytes():
    n, h, w = 16, 96, 80
    rng = np.random.default_rng(9)
    x = images(n, h, w)
    mats, axes = random_maps(n, h, w, rng)
    cubic = torch.from_numpy(rng.random(n) < 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.warp_affine(x, mats, cubic, axes, ALL(n), FILL, kernels.RANDOM)
        torch.set_num_threads(3)
        three = kernels.warp_affine(x, mats, cubic, axes, ALL(n), FILL, kernels.RANDOM)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_a_cpu_call_runs_torch_ops_in_one_thread_and_restores_the_count(monkeypatch):
    """Inside a CPU call torch's own ops run in one thread (an OpenMP team per small op spins when other
    processes hold the cores) while the kernels split across the caller's threads; afterwards the count
    is the caller's again, also when the call fails."""
    seen = []
    real = kernels._run_images

    def spy(kernel, rows, *args, **kw):
        seen.append((torch.get_num_threads(), kernels._KERNEL_THREADS))
        return real(kernel, rows, *args, **kw)

    monkeypatch.setattr(kernels, "_run_images", spy)
    threads = torch.get_num_threads()
    aug = fa.make_train_augment("rand-m9-mstd0.5-inc1", 0.1, 1.0, 0.1, 10)
    x, labels = images(8, 32, 32), torch.arange(8)
    try:
        torch.set_num_threads(2)
        aug(x, labels, torch.Generator().manual_seed(0))
        assert seen and set(seen) == {(1, 2)} and torch.get_num_threads() == 2
        def fails(*args):
            assert torch.get_num_threads() == 1
            raise RuntimeError("the device part failed")

        aug._device_part = fails
        with pytest.raises(RuntimeError, match="device part failed"):
            aug(x, labels)
        assert torch.get_num_threads() == 2 and kernels._KERNEL_THREADS == 0
    finally:
        torch.set_num_threads(threads)


def test_fake_outputs_match_the_real_ones():
    """torch.compile plans with the fake kernels: their shapes, dtypes and strides must be the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, w = 6, 20, 24
    x = images(n, h, w, channels_last=False)
    mats, axes = random_maps(n, h, w, np.random.default_rng(1))
    cubic = torch.zeros(n, dtype=torch.bool)
    lut = torch.zeros((n, 3, 256), dtype=torch.uint8)
    kinds, factors = torch.ones(n, dtype=torch.int8), torch.ones(n)
    mix = torch.zeros((n, 6), dtype=torch.float64)
    scale, shift = torch.ones(3), torch.zeros(3)
    calls = [lambda a: kernels.warp_affine(a[0], a[1], a[2], a[3], a[2], a[4], kernels.RANDOM),
             lambda a: kernels.apply_lut(a[0], a[5]), lambda a: kernels.histogram(a[0]),
             lambda a: kernels.enhance(a[0], a[6], a[7]),
             lambda a: kernels.mix_normalize(a[0], a[8], a[9], a[10], torch.bfloat16)]
    args = (x, mats, cubic, axes, FILL, lut, kinds, factors, mix, scale, shift)
    mode = FakeTensorMode()
    fake_args = tuple(mode.from_tensor(a) for a in args)
    for call in calls:
        real = call(args)
        with mode:
            fake = call(fake_args)
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


def test_wrong_arguments_are_refused():
    x = images(2, 8, 8)
    with pytest.raises(RuntimeError, match="mats float64"):
        kernels.warp_affine(x, torch.zeros(2, 6, dtype=torch.float32), torch.zeros(2, dtype=torch.bool),
                            torch.zeros(2, dtype=torch.int8), ALL(2), FILL, kernels.BILINEAR)
    with pytest.raises(RuntimeError, match="tables uint8"):
        kernels.apply_lut(x, torch.zeros(2, 3, 255, dtype=torch.uint8))


TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np, torch
    from triton.runtime import interpreter as ti

    # The interpreter rounds tl.fma twice and truncates float32 -> bfloat16; the GPU rounds an fma once and
    # casts to nearest even. Give the interpreter the GPU's arithmetic (exact in float64 for these operands).
    def create_fma(self, x, y, z):
        out = (x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64))
        return ti.TensorHandle(out.astype(z.data.dtype), z.dtype.scalar)

    cast = ti.InterpreterBuilder.cast_impl
    def cast_impl(self, src, dst_type):
        import triton.language as tl
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return ti.TensorHandle(bits.astype(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    ti.InterpreterBuilder.create_fma = create_fma
    ti.InterpreterBuilder.cast_impl = cast_impl
    sys.path.insert(0, sys.argv[1])
    import fastrsb.augment as fa
    from fastrsb.augment import kernels, ops
    from fastrsb.augment.pipeline import _normalize_constants
    from test_kernels import ALL, FILL, images, random_maps

    rng = np.random.default_rng(0)
    n, h, w = 6, 13, 21
    x = images(n, h, w, seed=2)
    mats, axes = random_maps(n, h, w, rng)
    cubic = torch.from_numpy(rng.random(n) < 0.5)
    for mode, code in kernels.MODES.items():
        flags = cubic if mode == "random" else torch.full((n,), mode == "bicubic")
        active = torch.tensor([True, False, True, True, False, True])  # the skipped images are not compared
        ref = kernels.warp_affine(x, mats, cubic, axes, active, FILL, code)
        got = kernels._launch_warp(x, mats, flags, active, FILL, code)
        assert torch.equal(ref[active], got[active]), mode
    lut = torch.from_numpy(rng.integers(0, 256, (n, 3, 256)).astype(np.uint8))
    assert torch.equal(kernels.apply_lut(x, lut), kernels._launch_lut(x, lut))
    assert torch.equal(kernels.histogram(x), kernels._launch_hist(x))
    kinds, factors = torch.tensor([0, 1, 2, 1, 2, 2], dtype=torch.int8), torch.from_numpy(rng.uniform(0.1, 1.9, n)).float()
    assert torch.equal(kernels.enhance(x, kinds, factors), kernels._launch_enhance(x, kinds, factors))
    mix = fa.MixupCutmix(0.8, 1.0, prob=0.9, mode="elem", num_classes=10)
    packed = torch.from_numpy(mix.pack(mix.sample_params(n, h, w, torch.Generator().manual_seed(3))))
    assert packed[:, 1].any() and not packed[:, 1].all()
    scale, shift = _normalize_constants(torch.device("cpu"), fa.IMAGENET_DEFAULT_MEAN, fa.IMAGENET_DEFAULT_STD)
    for dtype in (torch.float32, torch.bfloat16):
        ref = kernels.mix_normalize(x, packed, scale, shift, dtype)
        assert torch.equal(ref, kernels._launch_mix_normalize(x, packed, scale.view(3), shift.view(3), dtype)), dtype
    out_cpu, out_tri = images(9, h, w, seed=5), images(9, h, w, seed=5)
    index, keep = torch.tensor([4, 0, 7, 4]), torch.tensor([True, True, False, False])
    kernels.put_rows_(out_cpu, index, keep, x[:4])
    kernels._launch_put_rows(out_tri, index, keep, x[:4])
    assert torch.equal(out_cpu, out_tri)
    assert torch.equal(kernels.grey_mean(x), kernels._launch_grey_mean(x))
    print("triton kernels equal the CPU kernels")
""")


def test_cuda_kernels_in_tritons_interpreter_equal_the_cpu_kernels(tmp_path):
    """The Triton kernels that run on CUDA, executed by Triton's CPU interpreter on small batches: the same
    bytes as the CPU kernels (and so as the torch-op definitions)."""
    pytest.importorskip("triton")
    script = tmp_path / "triton_kernels.py"
    script.write_text(TRITON_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, str(script), str(REPO)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "triton kernels equal the CPU kernels" in proc.stdout
