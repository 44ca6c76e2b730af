"""The built-in dataset: ImageNet-like sizes, distinct classes, and oddities that really are odd."""
import numpy as np
from PIL import Image

from fastrsb.demo_data import ODDITIES, make_demo_data


def test_oddities_are_what_they_claim(odd_dataset):
    folder = next(p for p in sorted((odd_dataset / "train").iterdir()) if (p / "odd_cmyk.JPEG").exists())
    assert set(ODDITIES) <= {p.name for p in folder.iterdir()}
    with Image.open(folder / "odd_cmyk.JPEG") as im:
        assert (im.format, im.mode) == ("JPEG", "CMYK")
    with Image.open(folder / "odd_gray.JPEG") as im:
        assert (im.format, im.mode) == ("JPEG", "L")
    with Image.open(folder / "odd_png_named.JPEG") as im:
        assert (im.format, im.mode) == ("PNG", "RGBA")
    with Image.open(folder / "odd_palette.png") as im:
        assert im.mode == "P"
    with Image.open(folder / "odd_exif_rotated.JPEG") as im:
        assert im.getexif()[0x0112] == 6 and im.size == (200, 150)
    with Image.open(folder / "odd_large.JPEG") as im:
        assert im.size == (6000, 4500)
    assert (folder / "odd_empty.JPEG").stat().st_size == 0
    truncated = (folder / "odd_truncated.JPEG").read_bytes()
    assert truncated[:2] == b"\xff\xd8" and not truncated.endswith(b"\xff\xd9")


def test_sizes_vary_and_classes_differ(tmp_path):
    root = make_demo_data(tmp_path, num_classes=4, train_per_class=10, val_per_class=2, seed=3)
    sizes, means = set(), []
    for folder in sorted((root / "train").iterdir()):
        pixels = []
        for f in sorted(folder.iterdir()):
            with Image.open(f) as im:
                sizes.add(im.size)
                pixels.append(np.asarray(im.convert("RGB").resize((32, 32)), np.float32).mean((0, 1)))
        means.append(np.mean(pixels, 0))
    assert len(sizes) > 30  # 40 images, nearly all of different sizes
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.9 and max(aspects) > 1.2  # portrait and landscape
    means = np.array(means)
    gaps = [np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 10  # class colour means are far apart
