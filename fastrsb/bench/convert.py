"""Conversion throughput: `fastrsb convert` (both formats) per worker count, against the baseline a user
would otherwise run, ffcv-imagenet's `write_imagenet.py` recipe (torchvision ImageFolder of PIL images
into ffcv's DatasetWriter with RGBImageField jpg, max side 500, quality 90), measured in the same run.

    fastrsb bench convert [--images 2000] [--workers 1,2] [--out results.jsonl]
    python benchmarks/convert_throughput.py  (the same)

Prints one JSON line per worker count (see fastrsb/benchlog.py). The data are demo images sized like
ImageNet's (short side 300-500 px); the fastrsb figure includes writing the DALI shards too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from fastrsb.benchlog import emit, record
from fastrsb.convert import convert
from fastrsb.demo_data import make_demo_data


def baseline_ffcv_writer(src: Path, out: Path, workers: int) -> float:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(src))
    writer = DatasetWriter(str(out), {"image": RGBImageField(write_mode="jpg", max_resolution=500, jpeg_quality=90),
                                      "label": IntField()}, num_workers=workers)
    start = time.perf_counter()
    writer.from_indexed_dataset(dataset, chunksize=100)
    return len(dataset) / (time.perf_counter() - start)


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=2000, help="train images in the generated dataset")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and all cores)")
    parser.add_argument("--keep", default=None, help="generate the dataset here and keep it")


def run(args) -> None:
    counts = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, os.cpu_count() or 1})

    root = Path(args.keep or tempfile.mkdtemp(prefix="fastrsb-bench-convert-"))
    try:
        src = root / "src"
        if not (src / "train").exists():
            make_demo_data(src, num_classes=args.classes, train_per_class=args.images // args.classes,
                           val_per_class=1, min_size=300, max_size=500, seed=0)
        n = sum(1 for p in (src / "train").rglob("*") if p.is_file())
        # warm-up: imports, numba compilation and the page cache, for both contenders
        make_demo_data(root / "warm", num_classes=2, train_per_class=5, val_per_class=1, max_size=64, min_size=32)
        convert(root / "warm" / "train", root / "warm-out", split="train", workers=1, progress=False, log=lambda *a: None)
        baseline_ffcv_writer(root / "warm" / "train", root / "warm.beton", 1)
        for workers in counts:
            out = root / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            convert(src / "train", out, split="train", workers=workers, progress=False, log=lambda *a: None)
            rate = n / (time.perf_counter() - start)
            base = baseline_ffcv_writer(src / "train", root / f"baseline-{workers}.beton", workers)
            emit(record("convert", f"fastrsb convert beton+dali, {workers} workers", rate,
                        config={"images": n, "workers": workers, "max_side": 500, "quality": 90},
                        baseline=("ffcv DatasetWriter over torchvision ImageFolder (beton only)", base),
                        device="cpu"), args.out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

