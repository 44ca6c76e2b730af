"""Decode any image file a user's ImageFolder holds into bounded RGB pixels, or say why not.

Used by the converter and by the PIL reference loader over source folders, so both see the same
picture: EXIF orientation applied, CMYK / grayscale / palette / 16-bit made RGB, alpha composited
on white, and the longest side bounded to `max_side` the way FFCV's `RGBImageField(max_resolution)`
does it (OpenCV INTER_AREA, size floored), so FFCV never resizes again. Very large JPEGs are
decoded at a reduced DCT scale (PIL's `draft`), so a 75-Mpx file costs memory for ~1/64 of it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions torchvision's ImageFolder accepts (lower case); a file with one of them that cannot be
# decoded is a rejected image, any other undecodable file is a non-image file.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Decoding a non-JPEG image larger than this is refused (a JPEG is drafted down instead).
MAX_PIXELS = 1 << 30


class BadImage(Exception):
    """A file that cannot become a training image; `str(e)` is the reason, `non_image` says which list."""

    def __init__(self, reason: str, non_image: bool = False):
        super().__init__(reason)
        self.non_image = non_image


def bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """FFCV's resizer rule: scale so the longest side is max_side, sizes floored; never upscale."""
    if max_side is None:
        return width, height
    ratio = max_side / max(width, height)
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode: 16-bit rescaled, alpha composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array with max(H, W) <= max_side; raise BadImage with the reason."""
    import cv2

    path = Path(path)
    is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)", non_image=not is_image_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # we bound the size ourselves below
            try:
                with Image.open(path) as img:
                    if img.format == "JPEG" and max_side is not None:
                        target = bounded_size(*img.size, max_side)
                        if target[0] * 2 <= img.size[0]:
                            # DCT-domain downscale by 2, 4 or 8, never below the target size
                            img.draft("RGB", target)
                    if img.size[0] * img.size[1] > MAX_PIXELS:
                        raise BadImage(
                            f"too large to decode safely ({img.size[0]}x{img.size[1]} px > {MAX_PIXELS} px); "
                            "downscale it first (e.g. with ImageMagick's mogrify -resize)"
                        )
                    img = ImageOps.exif_transpose(img)
                    rgb = to_rgb(img)
                    arr = np.asarray(rgb, dtype=np.uint8)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except BadImage:
        raise
    except UnidentifiedImageError:
        if is_image_name:
            raise BadImage("cannot identify image format (corrupt, or not an image despite its name)") from None
        raise BadImage("not an image file", non_image=True) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(f"decoded to unexpected shape {arr.shape}")
    height, width = arr.shape[:2]
    new_w, new_h = bounded_size(width, height, max_side)
    if (new_w, new_h) != (width, height):
        arr = cv2.resize(arr, (max(new_w, 1), max(new_h, 1)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes exactly as FFCV's RGBImageField encodes (OpenCV, BGR order, given quality)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise BadImage("OpenCV could not encode the image as JPEG")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB pixels of JPEG bytes, decoded with OpenCV (what FFCV's raw mode stores)."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadImage("OpenCV could not decode the JPEG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
