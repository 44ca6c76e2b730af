"""A built-in ImageFolder dataset: visually distinct classes, ImageNet-like files, and ImageNet's oddities.

Each class has its own hue and its own pattern (stripes at a class-specific angle and frequency, with
a blob), so a small model can tell them apart after a few epochs, while positions, scales, noise and
image sizes vary per image. Sizes and aspect ratios vary like ImageNet's (short side 0.6-1.0 of
`max_size`, aspect 3:4 to 16:9, portrait or landscape).

`oddities=True` adds, to the train split, the files ImageNet really contains or users really have:
a CMYK JPEG, grayscale JPEGs, a PNG saved under a .JPEG name (with alpha), a palette PNG, an
EXIF-rotated JPEG, a truncated JPEG, a zero-byte file, a non-image file and a very large image.
Their names start with `odd_` and `ODDITIES` says what the converter must do with each.
"""
from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# name -> what a correct conversion does with it
ODDITIES = {
    "odd_cmyk.JPEG": "kept (converted to RGB)",
    "odd_gray.JPEG": "kept (converted to RGB)",
    "odd_png_named.JPEG": "kept (PNG with alpha under a .JPEG name; alpha composited on white)",
    "odd_palette.png": "kept (palette image converted to RGB)",
    "odd_exif_rotated.JPEG": "kept (EXIF orientation applied: stored 4:3 landscape, shown portrait)",
    "odd_large.JPEG": "kept (bounded to max side)",
    "odd_truncated.JPEG": "rejected (truncated JPEG)",
    "odd_empty.JPEG": "rejected (zero bytes)",
    "odd_notes.txt": "named as a non-image file",
}
KEPT_ODDITIES = [k for k, v in ODDITIES.items() if v.startswith("kept")]


def class_names(num_classes: int) -> list[str]:
    # ImageNet-style synset folder names; sorted order equals class index order.
    return [f"n{10000000 + i:08d}" for i in range(num_classes)]


def _class_style(label: int, num_classes: int) -> tuple[np.ndarray, float, float]:
    hue = label / num_classes
    rgb = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + s)) for s in (0.0, 1 / 3, 2 / 3)])
    angle = math.pi * ((label * 0.381966) % 1.0)  # golden-ratio spacing keeps neighbours apart
    freq = 3.0 + (label % 5) * 2.5
    return rgb, angle, freq


def render(label: int, num_classes: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`."""
    rgb, angle, freq = _class_style(label, num_classes)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    side = float(min(width, height))
    u, v = x / side, y / side
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (u * math.cos(angle) + v * math.sin(angle)) + phase)
    cx, cy = rng.uniform(0.2, 0.8) * width / side, rng.uniform(0.2, 0.8) * height / side
    radius = rng.uniform(0.15, 0.35)
    blob = ((u - cx) ** 2 + (v - cy) ** 2) < radius**2
    background = rng.uniform(0.1, 0.3, size=3)
    img = background + stripes[..., None] * (rgb * rng.uniform(0.7, 1.0) - background)
    img = np.where(blob[..., None], 1.0 - 0.6 * rgb, img)
    img = img + rng.normal(0, 0.04, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _random_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    short = int(rng.integers(min_size, max_size + 1))
    aspect = float(np.exp(rng.uniform(math.log(4 / 3), math.log(16 / 9)))) if rng.random() < 0.2 else float(
        np.exp(rng.uniform(0, math.log(4 / 3)))
    )
    long = int(round(short * aspect))
    return (long, short) if rng.random() < 0.75 else (short, long)  # mostly landscape, like ImageNet


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def _write_oddities(folder: Path, label: int, num_classes: int, rng: np.random.Generator, large_side: int) -> None:
    base = Image.fromarray(render(label, num_classes, 200, 150, rng))
    (folder / "odd_cmyk.JPEG").write_bytes(_jpeg_bytes(base.convert("CMYK")))
    (folder / "odd_gray.JPEG").write_bytes(_jpeg_bytes(base.convert("L")))
    rgba = base.convert("RGBA")
    alpha = np.full((150, 200), 255, np.uint8)
    alpha[:, :40] = 0  # a transparent band
    rgba.putalpha(Image.fromarray(alpha))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    (folder / "odd_png_named.JPEG").write_bytes(buf.getvalue())
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "odd_palette.png")
    # Stored 200x150 landscape; orientation 6 means "rotate 90 degrees clockwise to display".
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "odd_exif_rotated.JPEG").write_bytes(_jpeg_bytes(base, exif=exif.tobytes()))
    full = _jpeg_bytes(Image.fromarray(render(label, num_classes, 320, 240, rng)))
    (folder / "odd_truncated.JPEG").write_bytes(full[: len(full) * 6 // 10])
    (folder / "odd_empty.JPEG").write_bytes(b"")
    (folder / "odd_notes.txt").write_text("annotations a user left in a class folder\n")
    large = Image.fromarray(render(label, num_classes, 400, 300, rng)).resize(
        (large_side, large_side * 3 // 4), Image.Resampling.NEAREST
    )
    (folder / "odd_large.JPEG").write_bytes(_jpeg_bytes(large, quality=75))


def make_demo_data(
    out: str | Path,
    num_classes: int = 10,
    train_per_class: int = 60,
    val_per_class: int = 20,
    min_size: int = 96,
    max_size: int = 256,
    oddities: bool = False,
    large_side: int = 10000,
    seed: int = 0,
    train_copies: int = 1,
) -> Path:
    """Write OUT/train/<class>/*.JPEG and OUT/val/<class>/*.JPEG; returns OUT.

    `train_copies` > 1 stores each train image that many times under different names (hard links where
    the filesystem allows, else copies): a train split large enough for throughput benchmarks at batch
    2048 without rendering every image. Every copy is decoded and cropped on its own when read.

    `large_side` is the long side of the very large oddity (10000 x 7500 = 75 Mpx by default: more
    than any real ImageNet image, below PIL's decompression-bomb error threshold of 179 Mpx).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if min_size < 8 or max_size < min_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    if train_copies < 1:
        raise ValueError(f"train_copies must be at least 1, got {train_copies}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    names = class_names(num_classes)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = _random_size(rng, min_size, max_size)
                img = Image.fromarray(render(label, num_classes, w, h, rng))
                quality = int(rng.integers(75, 96))
                path = folder / f"{name}_{i:05d}.JPEG"
                path.write_bytes(_jpeg_bytes(img, quality=quality))
                for copy in range(1, train_copies if split == "train" else 1):
                    _link_or_copy(path, folder / f"{name}_{i:05d}_copy{copy}.JPEG")
    if oddities:
        _write_oddities(out / "train" / names[0], 0, num_classes, rng, large_side)
    return out
