"""Decode any image file a user's ImageFolder holds into bounded RGB pixels, or say why not.

Used by the converter and by the PIL reference loader over source folders, so both see the same
picture: EXIF orientation applied, CMYK / grayscale / palette / 16-bit / float made RGB, alpha
composited on white, and the longest side bounded to `max_side` the way FFCV's
`RGBImageField(max_resolution)` does it (OpenCV INTER_AREA, size floored), so FFCV never resizes
again. Very large JPEGs are decoded at a reduced DCT scale (PIL's `draft`), so a 75-Mpx file costs
memory for ~1/64 of it.

Decode memory is bounded: PIL's decompression-bomb guard stays on (`Image.open` refuses files that
declare more than 2 x 2^28 px), and nothing larger than `MAX_DECODE_PIXELS` (PIL's own default limit,
~89.5 Mpx, ~270 MB as RGB) is decoded, so a 140 KB PNG declaring 12000 x 12000 is rejected with its
size instead of taking 2.6 GB.

`prepare` is the converter's per-file step: a JPEG that is already fine (baseline or progressive,
RGB or grayscale, no EXIF rotation, within the size bound) keeps its original bytes; any other
image is decoded and re-encoded, and the reason is returned with it.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions torchvision's ImageFolder accepts (lower case); a file with one of them that cannot be
# decoded is a rejected image, any other undecodable file is a non-image file.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL's guard while opening: a file declaring more than twice this is refused by Image.open itself.
MAX_DECLARED_PIXELS = 1 << 28
# Nothing larger is decoded (after a JPEG's DCT-domain draft): PIL's default MAX_IMAGE_PIXELS.
MAX_DECODE_PIXELS = 89_478_485
# JPEG frame types every backend decodes (libjpeg-turbo in FFCV and PIL, nvJPEG and libjpeg-turbo
# in DALI): SOF0 baseline, SOF1 extended sequential, SOF2 progressive (Huffman coding).
KEEPABLE_SOF = (0, 1, 2)


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
    if img.mode == "F":  # float TIFFs: 0-1 (most tools) or 0-255; anything else has no 8-bit meaning
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise BadImage("float image with NaN or infinite values; save it as 8-bit")
        low, high = float(arr.min()), float(arr.max())
        if low >= 0 and high <= 1:
            arr = arr * 255.0
        elif not (low >= 0 and high <= 255):
            raise BadImage(f"float image with values in [{low:g}, {high:g}], neither 0-1 nor 0-255; save it as 8-bit")
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L").convert("RGB")
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


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror}") from None
    if not data:
        raise BadImage("empty file (0 bytes)", non_image=path.suffix.lower() not in IMAGE_EXTENSIONS)
    return data


def _decode(path: PurePosixPath | Path, data: bytes, max_side: int | None, keep_jpeg: bool):
    """(RGB array or None, kept-or-why, (width, height)): None and "" when the JPEG's own bytes are fine to
    keep, with the size they decode to (the one open of the file gives it)."""
    is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound follows
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = MAX_DECLARED_PIXELS  # PIL's guard stays on
            try:
                with Image.open(io.BytesIO(data)) as img:
                    why = reencode_reason(img, data, max_side) if keep_jpeg else "re-encoding asked for"
                    if why == "":
                        img.load()  # decodes (a truncated or damaged file is rejected here)
                        return None, "", img.size
                    if img.format == "JPEG" and max_side is not None:
                        target = bounded_size(*img.size, max_side)
                        if target[0] * 2 <= img.size[0]:
                            # DCT-domain downscale by 2, 4 or 8, never below the target size
                            img.draft("RGB", target)
                    if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
                        raise BadImage(
                            f"declares {img.size[0]}x{img.size[1]} px, more than {MAX_DECODE_PIXELS} px (PIL's "
                            "decompression-bomb limit): decoding would need over "
                            f"{img.size[0] * img.size[1] * 3 / 1e9:.1f} GB; downscale it first (e.g. mogrify -resize)"
                        )
                    img = ImageOps.exif_transpose(img)
                    arr = np.asarray(to_rgb(img), dtype=np.uint8)
                    return arr, why, (arr.shape[1], arr.shape[0])
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except BadImage:
        raise
    except UnidentifiedImageError:
        if is_image_name:
            raise BadImage("cannot identify image format (corrupt, or not an image despite its name)") from None
        raise BadImage("not an image file", non_image=True) from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None


def _bounded(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    import cv2

    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(f"decoded to unexpected shape {arr.shape}")
    height, width = arr.shape[:2]
    new_w, new_h = bounded_size(width, height, max_side)
    if (new_w, new_h) != (width, height):
        arr = cv2.resize(arr, (max(new_w, 1), max(new_h, 1)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr)


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array with max(H, W) <= max_side; raise BadImage with the reason."""
    path = Path(path)
    arr, _, _ = _decode(path, _read(path), max_side, keep_jpeg=False)
    return _bounded(arr, max_side)


def jpeg_frame_type(data: bytes) -> int | None:
    """n of the JPEG's SOFn marker (0 baseline, 1 extended, 2 progressive, 3 lossless, 9+ arithmetic...)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker - 0xC0
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def reencode_reason(img: Image.Image, data: bytes, max_side: int | None) -> str:
    """Why this opened file cannot keep its own bytes; "" when it can."""
    if img.format != "JPEG":
        return f"{img.format or 'unknown'} data, not JPEG"
    frame = jpeg_frame_type(data)
    if frame not in KEEPABLE_SOF:
        return f"JPEG frame type SOF{frame}, not baseline or progressive"
    if img.mode not in ("RGB", "L"):
        return f"{img.mode} JPEG"
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (0, 1):
        return f"EXIF orientation {orientation}"
    if max_side is not None and max(img.size) > max_side:
        return f"{img.size[0]}x{img.size[1]}, larger than --max-side {max_side}"
    if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
        return f"{img.size[0]}x{img.size[1]}, larger than {MAX_DECODE_PIXELS} px"
    return ""


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes  # what the shards and the beton store
    height: int
    width: int
    stored: str  # "kept" (the source's own bytes) or "re-encoded"
    why: str  # why it was re-encoded ("" when kept)
    source_sha256: str  # of the source file (kept: also of `jpeg`)


def prepare(path: str | os.PathLike, max_side: int | None, quality: int, keep_jpeg: bool = True) -> Prepared:
    """The converter's step for one file: keep a fine JPEG's bytes, else decode, bound and re-encode."""
    path = Path(path)
    return prepare_bytes(path, _read(path), max_side, quality, keep_jpeg)


def prepare_bytes(name: str | os.PathLike, data: bytes, max_side: int | None, quality: int,
                  keep_jpeg: bool = True) -> Prepared:
    """`prepare` for bytes read elsewhere (an archive member); `name` (its extension) only sorts an
    undecodable file into rejected images or non-image files, as for a file."""
    path = PurePosixPath(os.fsdecode(name))
    if not data:
        raise BadImage("empty file (0 bytes)", non_image=path.suffix.lower() not in IMAGE_EXTENSIONS)
    sha = hashlib.sha256(data).hexdigest()
    arr, why, (width, height) = _decode(path, data, max_side, keep_jpeg)
    if arr is None:
        return Prepared(data, height, width, "kept", "", sha)
    rgb = _bounded(arr, max_side)
    return Prepared(encode_jpeg(rgb, quality), int(rgb.shape[0]), int(rgb.shape[1]), "re-encoded", why, sha)


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
