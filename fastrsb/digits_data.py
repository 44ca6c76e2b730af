"""`fastrsb digits-data OUT`: a small real dataset as an ImageFolder, for runs on a CPU.

The UCI optical recognition of handwritten digits (Alpaydin & Kaynak 1998), as bundled with scikit-learn
(`sklearn.datasets.load_digits`): 1,797 images of 8x8 pixels with 17 grey levels, 10 classes, written by
people, not rendered here. Each is scaled to 0-255, upsampled with bicubic interpolation to `size` px,
made RGB and stored as a JPEG (quality 95) in OUT/train/<digit>/ or OUT/val/<digit>/. The split is
stratified and seeded (`sklearn.model_selection.train_test_split`): 1,497 train and 300 val images by
default. The same arguments write the same files.

Needs scikit-learn (`pip install fastrsb[evidence]`, also in the dev extra).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FastRSBError


def make_digits_data(out: str | os.PathLike, *, size: int = 64, val_images: int = 300, seed: int = 0,
                     quality: int = 95) -> Path:
    """Write the digits as OUT/{train,val}/<digit>/<index>.jpg; returns OUT."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise FastRSBError("fastrsb digits-data needs scikit-learn: pip install 'fastrsb[evidence]' "
                           "(or pip install scikit-learn)") from None
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)
    if not 10 <= val_images <= len(labels) - 10:
        raise FastRSBError(f"--val-images {val_images}: give 10 to {len(labels) - 10}")
    if size < 8:
        raise FastRSBError(f"--size {size}: give at least 8 px")
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(index, test_size=val_images, stratify=labels, random_state=seed)
    out = Path(out)
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in sorted(ids):
            folder = out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray(np.round(images[i] * (255 / 16)).astype(np.uint8), mode="L")
            grey.resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.jpg", quality=quality)
    return out
