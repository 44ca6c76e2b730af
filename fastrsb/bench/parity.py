"""Do the loader backends produce the same pixels, are they timm's, and are the crops timm's?

Question 1 (pixels): for the same seed, each installed backend reads the first `--batches` train and
val batches of epoch 0 (same samples, same boxes, flips and filters: `sampling.CropSpec`), on
`--device` (cuda: DALI decodes with nvJPEG, the others as on the CPU and copy); per image,
the mean absolute difference to the PIL backend (the reference: torchvision/timm decode with PIL),
in grey levels of 255. Reported: median and max over the images, per backend and split. What is
left is the JPEG decoder (libffcv decodes with libjpeg-turbo's fast integer DCT; DALI's CPU decoder
and nvJPEG are not PIL's libjpeg-turbo build) and rounding inside the resize.

Question 2 (timm): the same reads through timm's own transforms on the same JPEG bytes
(`timm_reference`): eval, `timm.data.create_transform(res, is_training=False, crop_pct,
interpolation="bicubic")`; train, timm's RandomResizedCropAndInterpolation for the read's box and
filter (torchvision's `F.resized_crop`: crop, then resize the crop) and the flip. Every backend, PIL
included: per-image mean |diff| median and max, and the median over the images of the mean over their
3-px border band, where crop-then-resize (taps clipped to the crop) and PIL's resize-with-box (taps
read around the box) differ.

Question 3 (crops): the crop area fraction and aspect ratio of `CropSpec.read` (10k reads) against
torchvision's `RandomResizedCrop.get_params` (10k draws, timm's sampler), per image size: the
two-sample Kolmogorov-Smirnov statistic, with its 1% critical value 1.628 * sqrt(2 / n).

    fastrsb bench parity --demo                 # a demo dataset in a temp dir (converted both formats)
    fastrsb bench parity OUT --res 224 --out benchmarks/results/parity.jsonl

Output: JSON lines (fastrsb.benchlog), one per (backend, split, reference) and per (image size,
quantity), and a table on stdout. Question 2 reads the converted dataset's shards (as DALI and PIL do).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from fastrsb.benchlog import emit, failure, record

CROP_SIZES = ((375, 500), (500, 375), (333, 500), (224, 224))  # ImageNet's common shapes, and a square


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int, alpha: float = 0.01) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def crop_distributions(height: int, width: int, draws: int = 10_000, seed: int = 0) -> dict:
    """KS statistics of crop area fraction and log aspect (w/h): CropSpec.read vs torchvision."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    from fastrsb.loaders import sampling

    spec = sampling.CropSpec(train=True, seed=seed)
    res = 224  # the output size; train boxes do not depend on it
    ours = np.asarray([spec.read(height, width, int(t), res)[:4] for t in sampling.tag(np.arange(draws), 0, 0)])
    torch.manual_seed(seed)
    img = torch.empty(1, height, width)
    theirs = np.asarray([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(draws)])
    area = height * width
    out = {}
    for name, f in (("area", lambda b: b[:, 2] * b[:, 3] / area), ("log_aspect", lambda b: np.log(b[:, 3] / b[:, 2]))):
        out[name] = {"ks": ks_statistic(f(ours), f(theirs)), "critical_1pct": ks_critical(draws, draws),
                     "mean": float(f(ours).mean()), "mean_torchvision": float(f(theirs).mean())}
    return out


def read_reads(backend: str, data, split: str, *, batches: int, **kw):
    """(images uint8 NCHW, labels, tagged reads, crop spec) of the first `batches` batches of epoch 0."""
    import torch

    from fastrsb.loaders import make_loader

    loader = make_loader(backend, data, split, verbose=False, **kw)
    xs, ys = [], []
    for k, (x, y) in enumerate(loader):
        xs.append(x.cpu().contiguous().clone())
        ys.append(y.cpu().clone())
        if k + 1 >= batches:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    tagged, crop = loader.plan.tagged(0)[:y.numel()], loader.crop
    del loader
    return x, y, tagged, crop


def read_batches(backend: str, data, split: str, *, batches: int, **kw):
    """(images uint8 NCHW, labels) of the first `batches` batches of epoch 0."""
    x, y, _, _ = read_reads(backend, data, split, batches=batches, **kw)
    return x, y


def timm_reference(data, split: str, tagged, res: int, crop) -> "torch.Tensor":
    """timm's own transforms, image by image, on the JPEG bytes the backends decode (the converted
    dataset's shards, decoded as the PIL backend does): uint8 NCHW.

    Eval: `timm.data.create_transform(res, is_training=False, crop_pct, interpolation="bicubic")`, the
    pipeline of the RSB paper's figures. Train: timm's RandomResizedCropAndInterpolation for the read's own
    box and filter (`crop.read`), i.e. torchvision's `F.resized_crop` (crop, then resize the crop), then
    RandomHorizontalFlip's `F.hflip` when the read flips."""
    import timm.data
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from fastrsb.loaders import sampling
    from fastrsb.loaders.imagefolder import decode_rgb
    from fastrsb.loaders.layout import ShardBytes, ShardIndex

    read = ShardBytes(ShardIndex.load(data, split))
    eval_transform = timm.data.create_transform(res, is_training=False, crop_pct=crop.crop_pct,
                                                interpolation="bicubic", use_prefetcher=True)  # uint8 CHW
    out = []
    for t in np.asarray(tagged, np.int64):
        img = decode_rgb(read(int(t) & sampling.SAMPLE_MASK))
        if not crop.train:
            out.append(eval_transform(img))
            continue
        width, height = img.size
        top, left, h, w, flip, bicubic = crop.read(height, width, int(t), res)
        mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
        img = F.resized_crop(img, int(top), int(left), int(h), int(w), [res, res], mode)
        out.append(F.pil_to_tensor(F.hflip(img) if flip else img))
    return torch.stack(out)


BORDER_PX = 3  # the band along the edges where crop-then-resize and resize-with-box read different taps


def image_differences(x, ref) -> dict:
    """Per-image mean |x - ref| (grey levels) over the whole image and over its BORDER_PX-pixel border band:
    {"median", "max", "border_median", "images"}."""
    import torch

    diff = (x.float() - ref.float()).abs()
    per_image = diff.mean(dim=(1, 2, 3))
    band = torch.ones(diff.shape[-2:], dtype=torch.bool)
    band[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = False
    border = diff[..., band].mean(dim=(1, 2))
    return {"median": float(per_image.median()), "max": float(per_image.max()),
            "border_median": float(border.median()), "images": int(x.shape[0])}


def timm_parity(data, split: str, backends, *, batches: int, res: int, **kw) -> dict:
    """{backend: image_differences(backend's batches, timm_reference of the same reads)}: every backend,
    the PIL one included, against timm's transforms."""
    out, ref, reads = {}, None, None
    for b in backends:
        try:
            x, y, tagged, crop = read_reads(b, data, split, batches=batches, res=res, **kw)
        except Exception as e:  # a backend that cannot build or read here is named, and the others go on
            print(f"# {b}: skipped, {failure(e)}", flush=True)
            continue
        if ref is None:
            ref, reads = timm_reference(data, split, tagged, res, crop), tagged
        elif not np.array_equal(tagged, reads):
            raise AssertionError(f"{b} read other samples than {next(iter(out))} for {split}: the plan is not shared")
        out[b] = image_differences(x, ref)
    return out


def pixel_parity(data, split: str, backends, *, reference: str = "pil", batches: int, **kw) -> dict:
    """{backend: {"median", "max", "images"}} of per-image mean |diff| to the reference backend."""
    ref_x, ref_y = read_batches(reference, data, split, batches=batches, **kw)
    out = {}
    for b in backends:
        if b == reference:
            continue
        try:
            x, y = read_batches(b, data, split, batches=batches, **kw)
        except Exception as e:  # a backend that cannot build or read here is named, and the others go on
            print(f"# {b}: skipped, {failure(e)}", flush=True)
            continue
        if not (y.shape == ref_y.shape and bool((y == ref_y).all())):
            raise AssertionError(f"{b} and {reference} read different samples for {split}: the plan is not shared")
        per_image = (x.float() - ref_x.float()).abs().mean(dim=(1, 2, 3))
        out[b] = {"median": float(per_image.median()), "max": float(per_image.max()), "images": int(x.shape[0])}
    return out


def add_arguments(p) -> None:
    p.add_argument("data_pos", nargs="?", type=Path, metavar="DATA", help="folder written by fastrsb convert")
    p.add_argument("--data", type=Path, help="the same as DATA")
    p.add_argument("--demo", action="store_true", help="make and convert a demo dataset (10 classes, 200-400 px)")
    p.add_argument("--backends", default="ffcv,dali,pil", help="compared with pil (the reference)")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--res", type=int, default=160, help="train resolution (val: --val-res)")
    p.add_argument("--val-res", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches compared per backend and split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=10_000, help="crop boxes per image size for the KS statistics")
    p.add_argument("--workers", type=int, default=None, help="default: the cores this process may use")
    p.add_argument("--device", default="cpu", help="where the loaders deliver (cuda: DALI decodes with nvJPEG)")


def run(args) -> list[dict]:
    from fastrsb.errors import FastRSBError
    from fastrsb.loaders import registry

    data = args.data or args.data_pos
    tmp = None
    if args.demo:
        tmp = tempfile.TemporaryDirectory(prefix="fastrsb-parity-")
        from fastrsb.bench.loader import make_demo

        data = make_demo(Path(tmp.name), per_class=20)[1]
    if data is None:
        raise FastRSBError("fastrsb bench parity: pass DATA (a folder written by fastrsb convert) or --demo")
    workers = args.workers or len(os.sched_getaffinity(0))
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(registry.names()))
    if unknown:
        raise FastRSBError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(registry.names())}")
    config = {"data": str(data), "seed": args.seed, "batch_size": args.batch_size, "batches": args.batches,
              "crop_pct": args.crop_pct, "workers": workers, "device": args.device}
    out, table = [], []

    for split in args.splits.split(","):
        res = args.res if split == "train" else args.val_res
        here = []
        for b in backends:
            if not registry.usable(b) or not registry.get(b).has_data(Path(data), split):
                print(f"# {b}: skipped ({registry.why_unusable(b) or 'cannot read ' + str(data) + ' ' + split})",
                      flush=True)
                continue
            here.append(b)
        if "pil" not in here:
            print(f"# {split}: the PIL reference cannot read {data}; skipped", flush=True)
            continue
        kw = dict(batches=args.batches, batch_size=args.batch_size, res=res, device=args.device, seed=args.seed,
                  crop_pct=args.crop_pct, num_workers=workers)
        for reference, result in (("pil", pixel_parity(data, split, here, **kw)),
                                  ("timm", timm_parity(data, split, here, **kw))):
            for b, r in result.items():
                extra = {"border_median": round(r["border_median"], 3)} if "border_median" in r else {}
                rec = record("parity", f"{b} {split} vs {reference}", r["median"],
                             unit="grey levels (per-image mean |diff|, median)",
                             config={**config, "backend": b, "split": split, "res": res}, device=args.device,
                             max=round(r["max"], 3), images=r["images"], **extra)
                out.append(emit(rec, args.out))
                border = f"{r['border_median']:>10.3f}" if extra else f"{'':>10}"
                table.append(f"# {b:6} {split:6} {res:5} {reference:>6} {r['median']:>12.3f} {r['max']:>9.3f} {border}")

    ks_rows = []
    for height, width in CROP_SIZES:
        stats = crop_distributions(height, width, draws=args.draws, seed=args.seed)
        for name, s in stats.items():
            rec = record("parity", f"crop {name} KS {height}x{width}", s["ks"], unit="KS statistic",
                         config={"draws": args.draws, "seed": args.seed, "height": height, "width": width},
                         critical_1pct=round(s["critical_1pct"], 4), mean=round(s["mean"], 4),
                         mean_torchvision=round(s["mean_torchvision"], 4))
            out.append(emit(rec, args.out))
            ks_rows.append(f"# {height}x{width:<5} {name:11} {s['ks']:>7.4f} {s['critical_1pct']:>9.4f}")
    print(f"# {'backend':6} {'split':6} {'res':>5} {'vs':>6} {'median |d|':>12} {'max |d|':>9} {'border':>10}   "
          f"(per-image mean abs diff to the PIL backend or to timm's transforms, grey levels; border: the "
          f"{BORDER_PX}-px edge band, median)", flush=True)
    for line in table:
        print(line, flush=True)
    print(f"# {'image':9} {'quantity':11} {'KS':>7} {'1% crit.':>9}   (CropSpec.read vs torchvision "
          f"RandomResizedCrop, {args.draws} draws each)", flush=True)
    for line in ks_rows:
        print(line, flush=True)
    if tmp is not None:
        tmp.cleanup()
    return out
