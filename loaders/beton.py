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
    """Indexable (PreparedImage, label) pairs read from webdataset shards at the offsets of their .idx.

    Held as arrays, one entry per sample in beton order, not an object per sample: 44 bytes a sample. `tars`: the shard paths; `shard`: each sample's position in `tars`; `key`: its
    key in the shard (the integer its name spells, `%09d`), for messages."""

    def __init__(self, tars: list[str], shard, offset, size, label, height, width, key):
        self.tars = [str(t) for t in tars]
        self.shard = np.asarray(shard, np.int32)
        self.offset, self.size = np.asarray(offset, np.int64), np.asarray(size, np.int64)
        self.label = np.asarray(label, np.int64)
        self.height, self.width = np.asarray(height, np.int32), np.asarray(width, np.int32)
        self.key = np.asarray(key, np.int64)
        if not len(self.shard) == len(self.offset) == len(self.size) == len(self.label) == len(self.height) \
                == len(self.width) == len(self.key):
            raise ValueError("ShardSamples: the per-sample arrays differ in length")
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index: int):
        index = int(index)
        tar_path = self.tars[self.shard[index]]
        f = self._files.get(tar_path)
        if f is None:
            f = self._files[tar_path] = open(tar_path, "rb")
        member = Member(f"{int(self.key[index]):09d}", "jpg", int(self.offset[index]), int(self.size[index]))
        jpeg = read_member(tar_path, member, f)
        return PreparedImage(index, jpeg, int(self.height[index]), int(self.width[index])), int(self.label[index])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


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
    finally:
        if hasattr(samples, "close"):
            samples.close()
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class StoredImage:
    jpeg: bool  # False: raw pixels
    width: int
    height: int
    data: bytes
    label: int


class BetonReader:
    """Random access to each sample's stored image (JPEG bytes or raw pixels) and label, without decoding;
    its arrays come from ffcv's Reader once (no dict of the allocations, no object per sample)."""

    def __init__(self, path: str | os.PathLike):
        import mmap

        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.reader import Reader

        self.path = Path(path)
        reader = Reader(str(path))
        self.num_samples = reader.num_samples
        image, label = reader.metadata["f0"], reader.metadata["f1"]
        self.jpeg = image["mode"] == IMAGE_MODES["jpg"]
        self.width, self.height = image["width"], image["height"]
        self.ptr, self.label = image["data_ptr"], label
        # each sample's allocation, found by its pointer in the sorted allocation table
        order = np.argsort(reader.alloc_table["ptr"], kind="stable")
        ptrs, alloc = reader.alloc_table["ptr"][order], reader.alloc_table["size"][order]
        at = np.minimum(np.searchsorted(ptrs, self.ptr), max(len(ptrs) - 1, 0))
        if len(self.ptr) and (not len(ptrs) or not np.array_equal(ptrs[at], self.ptr)):
            bad = int(np.flatnonzero(ptrs[at] != self.ptr)[0]) if len(ptrs) else 0
            raise ValueError(f"{path}: sample {bad} points at no allocation of the file (damaged)")
        self.size = alloc[at] if len(ptrs) else np.zeros(0, np.int64)
        self._file = open(path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if len(self.ptr) else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> "StoredImage":
        ptr = int(self.ptr[i])
        return StoredImage(bool(self.jpeg[i]), int(self.width[i]), int(self.height[i]),
                           bytes(self._mm[ptr:ptr + int(self.size[i])]), int(self.label[i]))

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        self._file.close()


def read_beton(path: str | os.PathLike):
    """Each sample's stored image (JPEG bytes or raw pixels) and label, in file order, without decoding."""
    reader = BetonReader(path)
    try:
        for i in range(len(reader)):
            yield reader[i]
    finally:
        reader.close()
