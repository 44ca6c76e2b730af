"""fastrsb.augment against timm's PIL RandAugment ops and timm.data.Mixup (CPU tensors), and the
capturability of a call: the same ops for every draw, a ceiling on their number, compiled = eager."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import timm.data.auto_augment as timm_aa
from timm.data.mixup import Mixup as TimmMixup, mixup_target as timm_mixup_target, cutmix_bbox_and_lam

from fastrsb import augment as fa


def natural_image(h=96, w=128, seed=0):
    """Smooth gradients, a disc, a rectangle and pixel noise: exercises every op's code paths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 150 * xx / w + 20 * np.sin(yy / 7),
                    60 + 120 * yy / h + 25 * np.cos(xx / 9),
                    180 - 100 * (xx + yy) / (w + h)], -1)
    img[(yy - h * 0.4) ** 2 + (xx - w * 0.3) ** 2 < (h * 0.2) ** 2] = (220, 40, 50)
    img[int(h * 0.55):int(h * 0.85), int(w * 0.55):int(w * 0.9)] = (30, 90, 200)
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(hwc):
    return torch.from_numpy(hwc).permute(2, 0, 1)[None].contiguous()


# Per-op tolerance against timm's PIL op at the same magnitude and sign, in 0..255 units:
# (max |diff|, max fraction of pixels that differ at all).
#  * LUT ops (autocontrast, equalize, invert, posterize, solarize*) follow PIL's integer LUTs: exact.
#  * enhance ops (blend with a degenerate image, truncated like PIL's ImagingBlend): PIL blends in
#    float from a double alpha, we use float32 lerp, so a value that lands on an integer can truncate
#    one lower: off by 1 on <1% of pixels (measured: <=0.5%).
#  * geometric ops: PIL's maps, its "fill outside, edge-clamped bilinear inside" rule and its
#    truncation, with float64 source coordinates like PIL; the float32 interpolation can still land a
#    hair below an integer that PIL reaches exactly: off by 1 on <0.5% of pixels (measured <=0.09%).
EXACT = dict(max_diff=0, frac_diff=0.0, frac_big=0.0)
ENHANCE = dict(max_diff=1, frac_diff=0.01, frac_big=0.0)
GEOMETRIC = dict(max_diff=1, frac_diff=0.005, frac_big=0.0)
TOLERANCE = {
    **{name: EXACT for name in ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing",
                                "Solarize", "SolarizeIncreasing", "SolarizeAdd")},
    **{name: ENHANCE for name in ("Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
                                  "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing")},
    **{name: GEOMETRIC for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")},
}
IMAGE = natural_image()


def timm_op(name, magnitude, negate, monkeypatch, fill=fa.TIMM_FILL, interpolation=Image.BILINEAR):
    """timm's AugmentOp at a fixed magnitude with prob 1, one interpolation, the sign forced."""
    monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
    hparams = dict(translate_const=250, img_mean=fill, interpolation=interpolation)
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    return np.asarray(op(Image.fromarray(IMAGE))).astype(np.int16)


def test_tolerance_table_covers_every_op():
    assert set(TOLERANCE) == set(fa.OP_NAMES)
    assert set(fa.RAND_INCREASING_OPS) <= set(fa.OP_NAMES) and set(fa.RAND_OPS) <= set(fa.OP_NAMES)


@pytest.mark.parametrize("name", fa.OP_NAMES)
def test_op_matches_timm(name, monkeypatch):
    tol = TOLERANCE[name]
    signs = (False, True) if name in fa.SIGNED_OPS else (False,)
    # 9.5 not 10: Pillow 13's posterize refuses 0 bits, which timm asks for at magnitude 10
    changed = []
    for magnitude in (2.6, 6.0, 9.5):
        for negate in signs:
            ref = timm_op(name, magnitude, negate, monkeypatch)
            out = fa.apply_op(name, to_tensor(IMAGE), -magnitude if negate else magnitude)
            diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(np.int16) - ref)
            where = f"{name} m={magnitude} negated={negate}"
            assert diff.max() <= tol["max_diff"], where
            assert (diff > 0).mean() <= tol["frac_diff"], where
            assert (diff > 1).mean() <= tol["frac_big"], where
            changed.append(np.abs(ref - IMAGE.astype(np.int16)).mean() > 0.5)
    # e.g. Solarize at 9.5 (threshold 243) leaves this image alone; most cases must change it
    assert sum(changed) >= len(changed) - 1, f"{name}: the references did nothing, the test would be vacuous"


def test_geometric_fill_matches_timm_img_mean(monkeypatch):
    fill = (124, 116, 104)  # what timm's create_transform passes: ImageNet mean in uint8
    ref = timm_op("Rotate", 9.0, False, monkeypatch, fill=fill)
    out = fa.apply_op("Rotate", to_tensor(IMAGE), 9.0, fill=fill)[0].permute(1, 2, 0).numpy()
    diff = np.abs(out.astype(np.int16) - ref)
    assert (diff > 1).mean() <= 0.002
    assert tuple(out[0, 0]) == fill  # a corner rotated by 27 degrees samples outside the image


@pytest.mark.parametrize("name,timm_fn,arg,magnitude", [
    ("Rotate", timm_aa.rotate, 17.0, 17.0 / 3), ("ShearX", timm_aa.shear_x, 0.21, 7.0),
    ("TranslateYRel", timm_aa.translate_y_rel, -0.3, -0.3 / 0.045)])
def test_nearest_interpolation_matches_pil(name, timm_fn, arg, magnitude):
    ref = np.asarray(timm_fn(Image.fromarray(IMAGE), arg, resample=Image.NEAREST, fillcolor=(128,) * 3))
    out = fa.apply_op(name, to_tensor(IMAGE), magnitude, interpolation="nearest", fill=128)[0].permute(1, 2, 0).numpy()
    # exact but for source points that fall on a pixel edge (float64 ties, rotation only): <0.2%
    assert (out != ref).mean() < 0.002


def test_geometric_identity_is_exact():
    x = small_batch(2, 160, 160)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        assert torch.equal(fa.apply_op(name, x, 0.0), x), name


def test_apply_op_per_sample_magnitudes_and_sign():
    x = to_tensor(IMAGE).repeat(3, 1, 1, 1)
    out = fa.apply_op("Rotate", x, torch.tensor([5.0, -5.0, 0.0]))
    assert torch.equal(out[2], x[2])  # magnitude 0: identity
    assert torch.equal(out[0], fa.apply_op("Rotate", x[:1], 5.0)[0])
    assert torch.equal(out[1], fa.apply_op("Rotate", x[:1], -5.0)[0])
    assert not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="Rotat"):
        fa.apply_op("Rotat", x, 1.0)
    with pytest.raises(ValueError, match="magnitudes"):
        fa.apply_op("Rotate", x, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# RandAugment: grammar, sampler statistics against timm's, batch application
# ---------------------------------------------------------------------------------------------

def test_from_timm_grammar():
    ra = fa.RandAugment.from_timm("rand-m6-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.num_ops, ra.prob, ra.magnitude_max) == (6, 0.5, 2, 0.5, 10)
    assert ra.ops == fa.RAND_INCREASING_OPS and len(ra.ops) == 15
    ra = fa.RandAugment.from_timm("rand-n3-m9-p0.7-mmax12-mstd101")
    assert (ra.num_ops, ra.magnitude, ra.prob, ra.magnitude_max, ra.magnitude_std) == (3, 9, 0.7, 12, float("inf"))
    assert ra.ops == fa.RAND_OPS
    assert fa.RandAugment.from_timm("rand").magnitude == 10
    for bad, token in [("rand-m6-foo", "foo"), ("augmix-m3", "augmix"), ("rand-inc2", "inc2"),
                       ("rand-tweights", "tweights"), ("rand-m", "'m'"), ("rand-n1.5", "n1.5"), ("rand-p2", "p2")]:
        with pytest.raises(ValueError, match=token) as info:
            fa.RandAugment.from_timm(bad)
        assert "rand-m6-mstd0.5-inc1" in str(info.value)  # the message shows the grammar
    with pytest.raises(ValueError, match="Blur"):
        fa.RandAugment(ops=["Rotate", "Blur"])


def timm_draws(config, images, seed=0):
    """Run timm's own RandAugment with recording ops: [(name, level args)] per applied op."""
    random.seed(seed)
    np.random.seed(seed)
    ra = timm_aa.rand_augment_transform(config, dict(translate_const=250, img_mean=(128, 128, 128)))
    record = []
    for op in ra.ops:
        op.aug_fn = (lambda name: lambda img, *args, **kw: (record.append((name, args)), img)[1])(op.name)
    img = Image.new("RGB", (2, 2))
    for _ in range(images):
        ra(img)
    return record


def test_sampler_matches_timm_statistics():
    config, images = "rand-m6-mstd0.5-inc1", 20000
    record = timm_draws(config, images)
    ra = fa.RandAugment.from_timm(config)
    p = ra.sample_params(images, torch.Generator().manual_seed(0))
    applied = p["applied"]
    # application rate: timm's and ours both ~Binomial(40000, 0.5); 5 sigma is 0.0125
    assert abs(applied.mean() - len(record) / (2 * images)) < 0.0125
    assert abs(applied.mean() - 0.5) < 0.0125
    # op frequencies among applied ops: each ~1/15; 5 sigma of a proportion over ~20000 is ~0.009
    ours = np.bincount(p["op_index"][applied], minlength=15) / applied.sum()
    timm_names = [name for name, _ in record]
    theirs = np.array([timm_names.count(name) for name in ra.ops]) / len(record)
    assert np.abs(ours - theirs).max() < 0.009
    assert np.abs(ours - 1 / 15).max() < 0.009
    # magnitudes: timm's Rotate gets +-m * 3 degrees; compare mean, std, sign rate with ours
    rot = np.array([args[0] for name, args in record if name == "Rotate"])
    m_ours = p["magnitude"][applied]
    assert abs(np.abs(m_ours).mean() - np.abs(rot / 3).mean()) < 0.04  # se ~0.004 and ~0.014
    assert abs(np.abs(m_ours).std() - np.abs(rot / 3).std()) < 0.04
    assert abs(np.abs(m_ours).mean() - 6.0) < 0.02 and abs(np.abs(m_ours).std() - 0.5) < 0.02
    signed = np.isin(np.array(ra.ops)[p["op_index"]], fa.SIGNED_OPS) & applied
    assert abs(p["negated"][signed].mean() - 0.5) < 0.02 and abs((rot < 0).mean() - 0.5) < 0.05
    assert not p["negated"][applied & ~signed].any() and (p["magnitude"][~applied] == 0).all()
    # unsigned ops: timm's posterize keeps 4 - int(m * 0.4) bits: 2 bits for 5 <= m < 7.5 (~97.6%)
    bits = np.array([args[0] for name, args in record if name == "PosterizeIncreasing"])
    m_post = np.abs(p["magnitude"][applied & (np.array(ra.ops)[p["op_index"]] == "PosterizeIncreasing")])
    assert abs((bits == 2).mean() - ((m_post >= 5) & (m_post < 7.5)).mean()) < 0.03  # se ~0.005


def test_sampler_clamps_and_uniform():
    p = fa.RandAugment.from_timm("rand-m10-mstd1").sample_params(20000, torch.Generator().manual_seed(1))
    m = np.abs(p["magnitude"][p["applied"]])
    assert m.max() <= 10.0 and abs((m == 10.0).mean() - 0.5) < 0.02  # half the draws clamp at mmax
    p = fa.RandAugment.from_timm("rand-m8-mstd200-mmax20").sample_params(20000, torch.Generator().manual_seed(2))
    m = np.abs(p["magnitude"][p["applied"]])
    assert m.min() >= 0 and m.max() <= 8 and abs(m.mean() - 4.0) < 0.1 and abs(m.std() - 8 / 12 ** 0.5) < 0.1


def small_batch(n=6, h=24, w=32):
    return torch.stack([to_tensor(natural_image(h, w, seed=i))[0] for i in range(n)])


def per_image(ra, x, params):
    """Each image's drawn ops applied one by one (the reference for the batched path)."""
    out = []
    for i in range(x.shape[0]):
        y = x[i:i + 1]
        for layer in range(ra.num_ops):
            if params["applied"][i, layer]:
                interpolation = "bicubic" if params["bicubic"][i, layer] else "bilinear"
                y = fa.apply_op(ra.ops[params["op_index"][i, layer]], y, params["magnitude"][i, layer],
                                fill=ra.fill, interpolation=interpolation)
        out.append(y)
    return torch.cat(out)


@pytest.mark.parametrize("config", ["rand-n3-m9-mstd0.5-p0.8-inc1", "rand-n2-m8-p0.9"])
def test_randaugment_batch_equals_per_image_ops(config):
    """The batched path gives what applying each image's drawn ops one by one gives, with the
    interpolation each geometric op drew."""
    ra = fa.RandAugment.from_timm(config)
    assert ra.interpolation == "random" and ra.fill == fa.TIMM_FILL  # timm's create_transform defaults
    x = small_batch(24)
    params = ra.sample_params(24, torch.Generator().manual_seed(3))
    out = ra.apply_params(x, params)
    geometric = np.isin(np.array(ra.ops)[params["op_index"]], ["Rotate", "ShearX", "ShearY", "TranslateXRel",
                                                                 "TranslateYRel"]) & params["applied"]
    reference = per_image(ra, x, params)
    for i in range(24):
        assert torch.equal(out[i:i + 1], reference[i:i + 1]), i
    assert params["applied"].sum() > 30 and not torch.equal(out, x)
    # both interpolations were drawn for geometric ops, so both paths were compared
    assert params["bicubic"][geometric].any() and not params["bicubic"][geometric].all()


def test_costly_stages_run_on_listed_images_only(monkeypatch):
    """The histogram, the blends and the warp gather a fixed number of listed images (fewer than the
    batch) and write them back: the same pixels as image by image. Also when a layer lists nobody, and
    when a list overflows its cap (that call then takes the whole batch)."""
    ra = fa.RandAugment.from_timm("rand-m9-mstd0.5-inc1")
    n = 96
    x = small_batch(n, 16, 20)
    caps = ra.capacities(n)
    assert all(cap < n for cap in caps) and caps[2] < n // 2  # the warp works on under half the batch
    params = ra.sample_params(n, torch.Generator().manual_seed(11))
    packed, used = ra.pack(params, 16, 20)
    assert used == (caps, caps)
    assert torch.equal(ra.apply_params(x, params), per_image(ra, x, params))

    nobody = {k: v.copy() for k, v in params.items()}  # layer 2 applies nothing: its lists are empty
    nobody["applied"][:, 1] = False
    nobody["magnitude"][:, 1] = 0
    assert torch.equal(ra.apply_params(x, nobody), per_image(ra, x, nobody))

    monkeypatch.setattr(ra, "capacities", lambda batch: (2, 2, 2))  # lists longer than 2 take the whole batch
    overflowed = [cap for layer in ra.pack(params, 16, 20)[1] for cap in layer]
    assert set(overflowed) <= {2, n} and overflowed.count(n) >= 4
    assert torch.equal(ra.apply_params(x, params), per_image(ra, x, params))


def test_randaugment_determinism_layout_and_errors():
    ra = fa.RandAugment.from_timm("rand-m7-mstd0.5-inc1")
    x = small_batch(8).contiguous(memory_format=torch.channels_last)
    a = ra(x, torch.Generator().manual_seed(5))
    b = ra(x, torch.Generator().manual_seed(5))
    c = ra(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        ra(x.float())
    with pytest.raises(ValueError, match="4-d"):
        ra(x[0])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        ra(x.permute(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------

def distinct_batch(n, h=16, w=20):
    """Image i is constant i * 2 + 1, so every pixel tells whose it is."""
    return (torch.arange(n, dtype=torch.uint8) * 2 + 1).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_area_equals_one_minus_lam(mode):
    n = 32
    x, labels = distinct_batch(n), torch.arange(n)
    mix = fa.MixupCutmix(0.0, 1.0, mode=mode, label_smoothing=0.0, num_classes=n)
    out, targets = mix(x, labels, torch.Generator().manual_seed(7))
    assert torch.allclose(targets.sum(1), torch.ones(n))
    lam = targets[torch.arange(n), labels]
    pasted = (out[:, 0] == x.flip(0)[:, 0].float()).float().mean(dim=(1, 2))
    own = (out[:, 0] == x[:, 0].float()).float().mean(dim=(1, 2))
    assert torch.allclose(pasted, 1 - lam, atol=1e-6) and torch.allclose(own + pasted, torch.ones(n))
    assert torch.allclose(targets[torch.arange(n), labels.flip(0)], 1 - lam, atol=1e-6)
    if mode == "pair":
        assert torch.allclose(lam, lam.flip(0))
    if mode == "batch":
        assert torch.allclose(lam, lam[0].expand(n))
    else:
        assert lam.unique().numel() > 4  # per-element draws


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_mixup_elem_pair_blend(mode):
    n = 16
    x, labels = distinct_batch(n).float(), torch.arange(n)
    mix = fa.MixupCutmix(0.4, 0.0, mode=mode, label_smoothing=0.0, num_classes=n)
    out, targets = mix(x, labels, torch.Generator().manual_seed(1))
    lam = targets[torch.arange(n), labels].view(n, 1, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x * lam + x.flip(0) * (1 - lam), atol=1e-4)


def test_lambda_distribution_is_beta():
    mix = fa.MixupCutmix(0.4, 0.0, mode="elem")
    lam = mix.sample_params(40000, 8, 8, torch.Generator().manual_seed(0))["lam"]
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 1 / (4 * (2 * 0.4 + 1))) < 0.005
    # switch prob 0.5 with both on, mix prob 0.8: a fifth untouched
    mix = fa.MixupCutmix(0.1, 1.0, prob=0.8, mode="elem")
    p = mix.sample_params(40000, 32, 32, torch.Generator().manual_seed(0))
    assert abs((p["lam"] == 1).mean() - 0.2) < 0.01
    assert abs(p["use_cutmix"].mean() - 0.4) < 0.01


def test_cutmix_corrected_lam_matches_timm_boxes():
    """Same λ, many boxes: our clipped-area λ has the distribution of timm's cutmix_bbox_and_lam."""
    np.random.seed(0)
    mix = fa.MixupCutmix(0.0, 1.0, mode="elem")
    rng = np.random.default_rng(0)
    for lam in (0.2, 0.7):
        _, theirs = cutmix_bbox_and_lam((3, 30, 40), lam, count=20000)
        (yl, yh, xl, xh), ours = mix._boxes(rng, np.full(20000, lam), 30, 40)
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
        assert ours.min() >= lam - 1e-9 and (yl >= 0).all() and (xh <= 40).all()


def test_targets_and_images_match_timm_mixup():
    n, classes = 8, 10
    x = torch.rand(n, 3, 6, 6) * 255
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    np.random.seed(0)
    timm_out, timm_targets = TimmMixup(mixup_alpha=0.2, label_smoothing=0.1, num_classes=classes)(x.clone(), labels)
    # timm's λ comes back in its targets: image 0 (label 3) is mixed with image 7 (label 6)
    ones = timm_mixup_target(labels, classes, 1.0, 0.1)
    on, off = ones.max().item(), ones.min().item()
    lam = (timm_targets[0, labels[0]] - off) / (on - off)
    assert 0 < lam.item() < 1
    mix = fa.MixupCutmix(0.2, 0.0, label_smoothing=0.1, num_classes=classes)
    params = dict(lam=np.full(n, lam.item()), use_cutmix=np.zeros(n, bool), boxes=np.zeros((n, 4), np.int64))
    out, targets = mix.apply_params(x, labels, params)
    assert torch.allclose(targets, timm_targets, atol=1e-6)
    assert torch.allclose(out, timm_out, atol=1e-3)
    # per-sample λ: timm's mixup_target with a (B, 1) λ
    lam_vec = np.linspace(0.1, 0.9, n)
    params = dict(lam=lam_vec, use_cutmix=np.zeros(n, bool), boxes=np.zeros((n, 4), np.int64))
    mix = fa.MixupCutmix(0.2, 0.0, mode="elem", label_smoothing=0.1, num_classes=classes)
    _, targets = mix.apply_params(x, labels, params)
    ref = timm_mixup_target(labels, classes, torch.tensor(lam_vec, dtype=torch.float32).view(-1, 1), 0.1)
    assert torch.allclose(targets, ref, atol=1e-6)


def test_mixup_determinism_and_errors():
    x, labels = distinct_batch(8), torch.arange(8)
    mix = fa.MixupCutmix(0.1, 1.0, mode="elem", num_classes=8)
    a = mix(x, labels, torch.Generator().manual_seed(3))
    b = mix(x, labels, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="even batch size.*7"):
        mix(x[:7], labels[:7])
    with pytest.raises(ValueError, match="mode"):
        fa.MixupCutmix(0.1, 1.0, mode="row")
    with pytest.raises(TypeError, match="integer"):
        mix(x, labels.float())


# ---------------------------------------------------------------------------------------------
# normalize and the whole pipeline
# ---------------------------------------------------------------------------------------------

def test_normalize():
    x = small_batch(2).contiguous(memory_format=torch.channels_last)
    out = fa.normalize(x)
    mean = torch.tensor(fa.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(fa.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    half = fa.normalize(x, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(half.float(), out, atol=0.02)
    assert torch.allclose(fa.normalize(x.float()), out)  # float 0..255 input, e.g. after mixup
    with pytest.raises(TypeError, match="floating"):
        fa.normalize(x, dtype=torch.int32)


def test_make_train_augment():
    aug = fa.make_train_augment("rand-m6-mstd0.5-inc1", 0.1, 1.0, 0.1, num_classes=10, dtype=torch.bfloat16)
    x = small_batch(8).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    images, targets = aug(x, labels, torch.Generator().manual_seed(0))
    assert images.shape == x.shape and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert targets.dtype == torch.float32 and targets.shape == (8, 10)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    again = aug(x, labels, torch.Generator().manual_seed(0))
    assert torch.equal(images, again[0]) and torch.equal(targets, again[1])
    with pytest.raises(ValueError, match="even batch size, got 7"):
        aug(x[:7], labels[:7])
    # no mixup, no RandAugment: normalised input and smoothed one-hot targets
    plain = fa.make_train_augment(None, 0.0, 0.0, 0.1, num_classes=10)
    images, targets = plain(x[:7], labels[:7])
    assert torch.allclose(images, fa.normalize(x[:7]))
    assert torch.allclose(targets, timm_mixup_target(labels[:7], 10, 1.0, 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_augment_issues_no_host_sync_on_cuda():
    x = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8).cuda().contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16).cuda() % 10
    aug = fa.make_train_augment("rand-m9-mstd0.5-inc1", 0.1, 1.0, 0.1, 10, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    aug(x, labels, gen)  # warm-up: pinned buffers, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            aug(x, labels, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# Bicubic and timm's defaults
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_bicubic_matches_timm(name, monkeypatch):
    """PIL's bicubic affine (cubic convolution, a = -1, in double): ours interpolates in float32, so a value
    that PIL truncates from just above an integer can come out one lower. Tolerance: off by 1 on at most
    0.5% of pixels, nothing larger (measured: at most 0.005%, 1 pixel of this 96x128 image)."""
    apart = []
    for magnitude in (2.6, 6.0, 9.5):
        for negate in (False, True):
            ref = timm_op(name, magnitude, negate, monkeypatch, interpolation=Image.BICUBIC)
            out = fa.apply_op(name, to_tensor(IMAGE), -magnitude if negate else magnitude, interpolation="bicubic")
            diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(np.int16) - ref)
            where = f"{name} m={magnitude} negated={negate}"
            assert diff.max() <= GEOMETRIC["max_diff"] and (diff > 0).mean() <= GEOMETRIC["frac_diff"], where
            bilinear = timm_op(name, magnitude, negate, monkeypatch, interpolation=Image.BILINEAR)
            apart.append((np.abs(bilinear - ref) > 1).mean())
    assert max(apart) > 0.01, f"{name}: PIL's bicubic and bilinear barely differ here, the test would be vacuous"


def test_random_interpolation_draws_per_application():
    ra = fa.RandAugment.from_timm("rand-m9")
    p = ra.sample_params(20000, torch.Generator().manual_seed(4))
    assert abs(p["bicubic"].mean() - 0.5) < 0.01  # 5 sigma of Binomial(40000, .5) is 0.0125
    assert not fa.RandAugment.from_timm("rand-m9", interpolation="bilinear").sample_params(100)["bicubic"].any()
    assert fa.RandAugment.from_timm("rand-m9", interpolation="bicubic").sample_params(100)["bicubic"].all()
    with pytest.raises(ValueError, match="interpolation"):
        fa.RandAugment(interpolation="lanczos")


def test_train_augment_defaults_are_timms():
    aug = fa.make_train_augment("rand-m6-mstd0.5-inc1", 0.1, 1.0, 0.1, 10)
    assert aug.rand_augment.fill == (124, 116, 104) and aug.rand_augment.interpolation == "random"
    assert aug.mixup.mode == "batch" and aug.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Capturable: the same ops whatever the draws, at most one host-to-device copy, compiled = eager
# ---------------------------------------------------------------------------------------------

# aten ops one call of make_train_augment("rand-m6-mstd0.5-inc1", 0.1, 1.0, ...) dispatches, whatever the
# batch size and the draws (views included, so an upper bound on kernels); recorded on the CPU with
# torch 2.14.1: 710, then 762 once the costly stages gather their listed images and write them back
# (about 26 ops per layer; the warp then runs on 83 of 256 images), then 790 with PIL's float32 blend rounding
# written out (casts a compiler cannot fuse away). A change that adds ops per call has to raise this
# on purpose.
OPS_PER_CALL_CEILING = 800
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.masked_scatter", "aten.item"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def recorded_ops(fn) -> list[str]:
    with RecordOps() as rec:
        fn()
    return rec.ops


def test_same_ops_for_every_draw_and_a_ceiling():
    aug = fa.make_train_augment("rand-m6-mstd0.5-inc1", 0.1, 1.0, 0.1, 10, dtype=torch.bfloat16)
    x = small_batch(8, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8)
    aug(x, labels)  # the first call on a device makes the cached constants
    seeds = range(6)
    sequences = [recorded_ops(lambda: aug(x, labels, torch.Generator().manual_seed(s))) for s in seeds]
    draws = [aug.sample_params(8, 32, 32, torch.Generator().manual_seed(s)) for s in seeds]
    # the seeds drew different things: cutmix and mixup batches, different op sets per image
    assert len({bool(d["mixup"]["use_cutmix"][0]) for d in draws}) == 2
    assert len({d["rand_augment"]["op_index"].tobytes() for d in draws}) == len(draws)
    assert all(seq == sequences[0] for seq in sequences)
    assert len(sequences[0]) <= OPS_PER_CALL_CEILING
    # the only host read is the seed drawn from the CPU generator, before any device work
    assert [op for op in sequences[0] if op in SYNC_OPS] == ["aten._local_scalar_dense"]
    assert sequences[0][:2] == ["aten.randint", "aten._local_scalar_dense"]
    # the count does not grow with the batch
    big, big_labels = small_batch(32, 32, 32).contiguous(memory_format=torch.channels_last), torch.arange(32) % 10
    aug(big, big_labels)
    assert recorded_ops(lambda: aug(big, big_labels, torch.Generator().manual_seed(0))) == sequences[0]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_ops_do_not_depend_on_draws(mode):
    mix = fa.MixupCutmix(0.8, 1.0, prob=0.7, mode=mode, num_classes=10)
    x, labels = distinct_batch(8), torch.arange(8)
    mix(x, labels)
    sequences = {tuple(recorded_ops(lambda: mix(x, labels, torch.Generator().manual_seed(s)))) for s in range(8)}
    assert len(sequences) == 1


def test_one_host_to_device_copy_per_call(monkeypatch):
    from fastrsb.augment import pipeline

    copies = []
    real = pipeline.to_device
    monkeypatch.setattr(pipeline, "to_device", lambda array, device: copies.append(array.shape) or real(array, device))
    aug = fa.make_train_augment("rand-m6-mstd0.5-inc1", 0.1, 1.0, 0.1, 10)
    aug(small_batch(8), torch.arange(8), torch.Generator().manual_seed(0))
    assert copies == [(8, aug.rand_augment.num_columns + 6)]  # RandAugment's and mixup's params together


def test_train_augment_is_randaugment_then_mixup_then_normalize():
    """Fails if either stage were a no-op: the output is RandAugment, then mixup, by hand with the same
    draws, and differs from every pipeline that skips a stage."""
    aug = fa.make_train_augment("rand-m9-mstd0.5-inc1", 0.4, 0.0, 0.1, 10)
    x = small_batch(8).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8)
    images, targets = aug(x, labels, torch.Generator().manual_seed(2))
    params = aug.sample_params(8, x.shape[2], x.shape[3], torch.Generator().manual_seed(2))
    assert 0.05 < params["mixup"]["lam"][0] < 0.95 and params["rand_augment"]["applied"].sum() >= 4
    ra_out = aug.rand_augment.apply_params(x, params["rand_augment"])
    mixed, mixed_targets = aug.mixup.apply_params(ra_out, labels, params["mixup"])
    assert torch.equal(images, fa.normalize(mixed))
    assert torch.equal(targets, mixed_targets)
    without_ra = fa.normalize(aug.mixup.apply_params(x, labels, params["mixup"])[0])
    without_mix = fa.normalize(ra_out)
    for skipped in (without_ra, without_mix, fa.normalize(x)):
        assert (images - skipped).abs().mean() > 0.05
    assert not torch.allclose(targets, fa.smooth_one_hot(labels, 10, 0.1))


def inductor_works() -> str | None:
    """None when torch.compile's inductor can build a CPU kernel here, else why not."""
    try:
        f = torch.compile(lambda t: t * 2 + 1, fullgraph=True, dynamic=False)
        f(torch.ones(3))
    except Exception as e:  # a missing compiler or headers: say so and skip
        return f"inductor cannot compile on this machine: {type(e).__name__}: {e}"[:300]
    return None


@pytest.mark.timeout(900)
def test_compiled_equals_eager():
    """torch.compile(fullgraph=True) of the device part, for the same draws: RandAugment's pixels bit for bit
    (PIL's integer rounding has to survive the compiler's fused multiply-adds), mixup's float blend and the
    normalisation to within float rounding, the targets exactly; one compile per shape (~60 s of
    compiling on a 2-core CPU)."""
    reason = inductor_works()
    if reason:
        pytest.skip(reason)
    # a size no other test uses: the compiled call comes first, as in the trainer, so the device constants
    # are made during this test; made inside the graph, they would force a second compile on the next call.
    # 48 images: every costly stage gathers fewer images than the batch, as in training
    x = small_batch(48, 31, 33).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(48) % 10
    config = "rand-m9-mstd0.5-inc1"

    def pixels(compiled: bool):
        """RandAugment's uint8 output, as floats (normalised with mean 0, std 1/255), with many blends,
        warps and histograms: PIL's truncation makes one rounding step a whole grey level (a plain
        torch.lerp blend fails here once compiled)."""
        ra = fa.RandAugment(("Sharpness", "ColorIncreasing", "Rotate", "Equalize"), num_ops=2, magnitude=9,
                            prob=0.9)  # a fixed magnitude: factors like 1.72, where exact integers are common
        aug = fa.TrainAugment(ra, None, 0.0, 10, mean=(0.0,) * 3, std=(1 / 255,) * 3)
        return aug.compile() if compiled else aug

    for eager, compiled in ((pixels(False), pixels(True)),
                            (fa.make_train_augment(config, 0.1, 1.0, 0.1, 10),
                             fa.make_train_augment(config, 0.1, 1.0, 0.1, 10).compile())):
        assert compiled.compiled and all(cap < 48 for cap in compiled.rand_augment.capacities(48))
        first = compiled(x, labels, torch.Generator().manual_seed(0))
        with torch._dynamo.config.patch(error_on_recompile=True):  # one graph per shape, whatever the draws
            for seed in range(4):
                b = compiled(x, labels, torch.Generator().manual_seed(seed))
                a = eager(x, labels, torch.Generator().manual_seed(seed))
                if compiled.mixup is None:
                    assert torch.equal(a[0], b[0]) and torch.equal(a[0], a[0].round()), seed
                else:
                    assert torch.allclose(a[0], b[0], rtol=0, atol=1e-5), seed
                assert torch.equal(a[1], b[1]), seed
                assert b[0].is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(first[0], eager(x, labels, torch.Generator().manual_seed(0))[0], rtol=0, atol=1e-5)


def test_device_part_on_a_fake_cuda_device_never_syncs_or_leaves_the_gpu():
    """The augmentation's device part traced on fake `cuda` tensors (no GPU needed): every op touches CUDA
    tensors only (a CPU constant mixed in would fail on a GPU), none reads a value back to the host, the
    outputs are on CUDA in the trainer's dtype and layout, and dynamo takes it as one graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from conftest import record_devices

    aug = fa.make_train_augment("rand-m6-mstd0.5-inc1", 0.1, 1.0, 0.1, 10, dtype=torch.bfloat16)
    packed, caps = aug.pack(aug.sample_params(8, 64, 64, torch.Generator().manual_seed(0)), 64, 64)
    with FakeTensorMode():
        cuda = torch.device("cuda", 0)
        x = torch.empty((8, 3, 64, 64), dtype=torch.uint8, device=cuda).contiguous(memory_format=torch.channels_last)
        labels = torch.zeros(8, dtype=torch.int64, device=cuda)
        packed_d = torch.empty(packed.shape, dtype=torch.float64, device=cuda)
        consts = aug.constants(cuda, 64, 64)
        with record_devices() as rec:
            images, targets = aug.apply_packed(x, labels, packed_d, caps, consts)
    assert len(rec.ops) > 100
    assert [op for op, devices in rec.ops if devices - {"cuda"}] == []
    assert [op for op, _ in rec.ops if op in SYNC_OPS] == []
    assert images.device == cuda and images.dtype == torch.bfloat16 and targets.device == cuda
    assert images.is_contiguous(memory_format=torch.channels_last) and targets.shape == (8, 10)
    # no graph break on the CPU either (the trainer compiles it with fullgraph=True on CUDA)
    x_cpu = small_batch(8, 64, 64).contiguous(memory_format=torch.channels_last)
    explained = torch._dynamo.explain(aug.apply_packed)(x_cpu, torch.arange(8), torch.from_numpy(packed), caps,
                                                         aug.constants(torch.device("cpu"), 64, 64))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
