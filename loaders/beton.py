"""FFCV .beton writer: the prepared JPEGs of the webdataset shards, stored through ffcv's DatasetWriter.

The converter decodes, orients, bounds and JPEG-encodes each source image once (as FFCV's own
`RGBImageField.encode` would: OpenCV, quality q, max side bounded with INTER_AREA) and writes
those bytes to the shards. The beton is then filled from the shards through ffcv's `DatasetWriter`
with an `RGBImageField` and an `IntField`; the only change is the image field's `encode`, which
stores the prepared bytes instead of encoding the pixels a second time:

- `jpg`: the same JPEG bytes as the shard (both backends then decode the very same picture);
- `raw`: the pixels of that JPEG, decoded with OpenCV;
- `proportion`: `jpg` for a share `compress_probability` of the samples, chosen by a hash of the
  sample index rather than `np.random`, so the file does not change from run to run.

One writer keeps the file byte-identical across runs (several workers interleave pages in arrival
order); in `jpg` mode the work is a copy, bound by the disk, not the CPU. It runs in the calling
process (`InProcessWriter`): ffcv's writer starts worker processes and polls a counter they update,
so a worker that dies (a full disk: ENOSPC) leaves it waiting forever; in-process, the OSError or
Ctrl-C reaches the caller at once.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .wds import Member, read_member

WRITE_MODES = ("jpg", "raw", "proportion")


@dataclass(frozen=True)
class PreparedImage:
    index: int
    jpeg: bytes
    height: int
    width: int


def store_as_jpeg(index: int, write_mode: str, compress_probability: float) -> bool:
    if write_mode == "jpg":
        return True
    if write_mode == "raw":
        return False
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < compress_probability


def _encode_prepared(field, destination, image: PreparedImage, malloc) -> None:
    """Stand-in for RGBImageField.encode (same metadata layout: mode, width, height, data_ptr)."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    from fastrsb.images import decode_jpeg

    destination["height"], destination["width"] = image.height, image.width
    if store_as_jpeg(image.index, field.write_mode_requested, field.proportion):
        data = np.frombuffer(image.jpeg, dtype=np.uint8)
        destination["mode"] = IMAGE_MODES["jpg"]
    else:
        pixels = decode_jpeg(image.jpeg)
        if pixels.shape[:2] != (image.height, image.width):
            raise ValueError(f"sample {image.index}: JPEG is {pixels.shape[:2]}, expected {(image.height, image.width)}")
        data = np.ascontiguousarray(pixels).reshape(-1)
        destination["mode"] = IMAGE_MODES["raw"]
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


class ShardSamples:
    """Indexable (PreparedImage, label) pairs read from webdataset shards at the offsets of their .idx."""

    def __init__(self, entries: list[tuple[str, Member, int, int, int]]):
        # (tar path, its jpg member, label, height, width) per sample, in beton order
        self.entries = entries
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        tar_path, member, label, height, width = self.entries[index]
        f = self._files.get(tar_path)
        if f is None:
            f = self._files[tar_path] = open(tar_path, "rb")
        jpeg = read_member(tar_path, member, f)
        return PreparedImage(int(index), jpeg, int(height), int(width)), int(label)

    def __getstate__(self):
        return {"entries": self.entries, "_files": {}}


def _in_process_writer():
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter, handle_sample

    class InProcessWriter(DatasetWriter):
        """ffcv's DatasetWriter with its one worker's job run here: same pages, same bytes, no child."""

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            (dataset,) = extra_worker_args
            self.num_samples = num_samples
            self.prepare()
            metadata = np.frombuffer(self.metadata_sm.buf, dtype=self.metadata_type)
            try:
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                with allocator:
                    for chunk in queue_content:
                        for dest_ix, source_ix in chunk:
                            handle_sample(dataset[source_ix], dest_ix, self.metadata_type.names, metadata,
                                          allocator, self.fields)
                self.finalize(allocator.allocations)
            finally:
                metadata = None  # no view of the shared memory may outlive it
                try:
                    self.metadata_sm.close()
                except BufferError:  # after an error, views in its traceback still hold it; freed with them
                    pass
                self.metadata_sm.unlink()

    return InProcessWriter


def write_beton(
    path: str | os.PathLike,
    samples: ShardSamples,
    write_mode: str = "jpg",
    max_side: int | None = None,
    quality: int = 90,
    compress_probability: float = 0.5,
) -> Path:
    """Write `samples` to `path` via a temporary file renamed when complete."""
    try:
        from ffcv.fields import IntField, RGBImageField
    except ImportError as e:
        from fastrsb.errors import missing_extra

        raise missing_extra("ffcv", "ffcv") from e
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write mode {write_mode!r}: choose one of {', '.join(WRITE_MODES)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    field = RGBImageField(
        write_mode="raw" if write_mode == "raw" else "jpg",
        max_resolution=max_side,
        jpeg_quality=quality,
        compress_probability=compress_probability,
    )
    field.write_mode_requested = write_mode
    field.encode = functools.partial(_encode_prepared, field)
    writer = _in_process_writer()(str(tmp), {"image": field, "label": IntField()}, num_workers=1)
    try:
        writer.from_indexed_dataset(samples, chunksize=256)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:  # a full disk or Ctrl-C: a partial file only takes space
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class StoredImage:
    jpeg: bool  # False: raw pixels
    width: int
    height: int
    data: bytes
    label: int


def read_beton(path: str | os.PathLike):
    """Each sample's stored image (JPEG bytes or raw pixels) and label, in file order, without decoding."""
    import mmap

    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    reader = Reader(str(path))
    image, label = reader.metadata["f0"], reader.metadata["f1"]
    sizes = {int(p): int(s) for p, s in zip(reader.alloc_table["ptr"], reader.alloc_table["size"])}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for i in range(reader.num_samples):
            ptr = int(image["data_ptr"][i])
            yield StoredImage(int(image["mode"][i]) == IMAGE_MODES["jpg"], int(image["width"][i]),
                              int(image["height"][i]), bytes(mm[ptr:ptr + sizes[ptr]]), int(label[i]))
