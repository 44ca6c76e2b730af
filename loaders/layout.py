"""The on-disk layout of a converted dataset: its paths, its tables, and where each sample's bytes lie.

Every module that reads or writes OUT goes through here (format_version 2)::

    OUT/classes.json                  JSON list of class-folder names; label = position in the list
    OUT/<split>/manifest.json         counts, kept/re-encoded/rejected/skipped files, options, versions,
                                      sha256 of every file, and `checksum` over the manifest itself
    OUT/<split>/samples.jsonl         the per-sample table (see below), in beton / shard order
    OUT/<split>/<split>.beton         FFCV: fields 'image' (RGBImageField) and 'label' (IntField)
    OUT/<split>/wds/<split>-NNNNNN.tar   webdataset shards (`wds.py`): `<key>.jpg` and `<key>.cls`
    OUT/<split>/wds/<split>-NNNNNN.idx   DALI's index for that shard (wds2idx format, v1.2)
    OUT/<split>/.convert-state.json   the converter's resume state: fingerprint, options, formats made

samples.jsonl: a header line `{"format_version": 2, "columns": [...]}`, then one JSON list per sample
with those columns. File names are stored as Python str made from the raw bytes by `os.fsdecode`
(surrogateescape) and written as JSON with ASCII escapes, so any name the file system allows
(newlines, tabs, non-UTF-8 bytes, 255-byte names) survives; `os.fsencode(row["source"])` gives back
the original bytes. Format 1 (samples.tsv) lost such names; its datasets are refused with the fix.

The source side: a split folder holds class folders, the non-hidden directories directly below it
(`find_classes`); labels are positions in their sorted list, as torchvision's ImageFolder sorts them.
"""
from __future__ import annotations

import hashlib
import array
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastrsb.errors import FastRSBError

from .wds import read_offsets, shard_paths

FORMAT_VERSION = 2
SAMPLE_COLUMNS = ("index", "key", "label", "height", "width", "shard", "source", "stored", "why", "source_sha256")
KEPT, REENCODED = "kept", "re-encoded"  # the `stored` column: the source's own bytes, or a new JPEG


# ------------------------------------------------------------------------------------------ paths

def classes_path(out) -> Path:
    return Path(out) / "classes.json"


def split_dir(out, split: str) -> Path:
    return Path(out) / split


def beton_path(out, split: str) -> Path:
    return split_dir(out, split) / f"{split}.beton"


WDS = "wds"  # the shards' folder inside a split; the manifest names their files "wds/<file>"


def wds_dir(out, split: str) -> Path:
    return split_dir(out, split) / WDS


def wds_file(name: str) -> str:
    """A shard file (`<split>-NNNNNN.tar` or `.idx`) as the manifest and samples.jsonl name it."""
    return f"{WDS}/{name}"


def wds_shards(out, split: str) -> list[Path]:
    return shard_paths(wds_dir(out, split))


def manifest_path(out, split: str) -> Path:
    return split_dir(out, split) / "manifest.json"


def samples_path(out, split: str) -> Path:
    return split_dir(out, split) / "samples.jsonl"


def state_path(out, split: str) -> Path:
    return split_dir(out, split) / ".convert-state.json"


def split_names(out) -> list[str]:
    """Splits with a manifest (a finished conversion), sorted."""
    return sorted(p.parent.name for p in Path(out).glob("*/manifest.json"))


def shown(name) -> str:
    """A file name fit for a one-line message: control characters and undecodable bytes escaped."""
    name = os.fsdecode(name)
    if name.isprintable():
        return name
    return json.dumps(name)[1:-1]  # \n, \t, \udcff (a non-UTF-8 byte), ...


# ---------------------------------------------------------------------------------------- classes

def find_classes(folder) -> list[str]:
    """Class folders of a source split: the non-hidden directories directly below it, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def is_converted(data) -> bool:
    return classes_path(data).is_file()


def _refuse_old_format(data) -> None:
    old = sorted(Path(data).glob("*/samples.tsv"))
    if old:
        raise FastRSBError(f"{Path(data)} was written by an older fastrsb (layout format 1, {old[0].name}); "
                           f"re-run fastrsb convert SRC into a new OUT folder (or delete {Path(data)} first)")


def read_classes(data) -> list[str]:
    path = classes_path(data)
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError:
        raise FastRSBError(f"{Path(data)}: no classes.json; this is not a folder fastrsb convert wrote: "
                           f"run fastrsb convert SRC {Path(data)}") from None
    except (OSError, ValueError) as e:
        raise FastRSBError(f"{path}: unreadable ({e}); re-run fastrsb convert SRC {Path(data)}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise FastRSBError(f"{path}: not a JSON list of class names; re-run fastrsb convert SRC {Path(data)}")
    _refuse_old_format(data)
    return classes


# ------------------------------------------------------------------------------ per-sample table

def write_samples(path, rows) -> None:
    """Write the per-sample table (rows: sequences in SAMPLE_COLUMNS order) to `path` via a temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:  # ensure_ascii: every name is escaped, nothing can fail
        f.write(json.dumps({"format_version": FORMAT_VERSION, "columns": list(SAMPLE_COLUMNS)}) + "\n")
        for row in rows:
            f.write(json.dumps(list(row), separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_table(path, take):
    """take(columns, lines) over the rows of a per-sample table; FastRSBError names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        _refuse_old_format(path.parent.parent)
        raise FastRSBError(f"no {path}: the conversion did not finish; run the same fastrsb convert again")
    try:
        with open(path, encoding="ascii") as f:
            header = json.loads(f.readline())
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {header.get('format_version')}, expected {FORMAT_VERSION}")
            return take(list(header["columns"]), f)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise FastRSBError(f"{path}: unreadable per-sample table ({e}); re-run fastrsb convert") from None


def read_samples(path) -> list[dict]:
    """The per-sample table as one dict per sample (ten columns each: readers that need a few integer
    columns of a large split use `read_sample_columns`, readers that go through it once `iter_samples`)."""
    return list(iter_samples(path))


def iter_samples(path):
    """The per-sample table's rows as dicts, one at a time; FastRSBError names the file, the line and the fix."""
    path = Path(path)
    columns, start = _read_table(path, lambda columns, lines: (columns, lines.tell()))
    with open(path, encoding="ascii") as f:
        f.seek(start)
        for n, line in enumerate(f, 2):
            try:
                row = dict(zip(columns, json.loads(line)))
            except (ValueError, TypeError) as e:
                raise FastRSBError(f"{path}: unreadable per-sample table (line {n}: {e}); re-run fastrsb convert") \
                    from None
            yield row


def read_sample_columns(path, names) -> dict[str, np.ndarray]:
    """Integer columns of the per-sample table as int64 arrays, parsed a row at a time."""
    def take(columns, lines):
        at = [columns.index(n) for n in names]
        picked = [array.array("q") for _ in names]  # 8 bytes a value, not an int object
        for line in lines:
            row = json.loads(line)
            for out, k in zip(picked, at):
                out.append(row[k])
        return {n: np.frombuffer(v, np.int64).copy() if len(v) else np.zeros(0, np.int64)
                for n, v in zip(names, picked)}

    return _read_table(path, take)


# ---------------------------------------------------------------------------------------- manifest

def manifest_checksum(manifest: dict) -> str:
    """sha256 over the manifest without its `checksum` field (canonical JSON), so edits are detected."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def manifest_text(manifest: dict) -> str:
    return json.dumps({**manifest, "checksum": manifest_checksum(manifest)}, indent=1) + "\n"


def read_manifest(out, split: str, check: bool = True) -> dict:
    """OUT/<split>/manifest.json, its format and (check=True) its checksum verified; FastRSBError otherwise."""
    path = manifest_path(out, split)
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise FastRSBError(f"no {path}: the conversion of {split} did not finish; run the same fastrsb convert "
                           "again") from None
    except (OSError, ValueError) as e:
        raise FastRSBError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it and run the same "
                           "fastrsb convert again to rewrite it") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FastRSBError(f"{path}: layout format {manifest.get('format_version')}, this fastrsb reads "
                           f"{FORMAT_VERSION}; re-run fastrsb convert SRC into a new OUT folder")
    if check and manifest.get("checksum") != manifest_checksum(manifest):
        raise FastRSBError(f"{path}: its checksum does not match its content (edited or damaged); delete it and "
                           "run the same fastrsb convert again to rewrite it")
    return manifest


# ------------------------------------------------------------------------ where the bytes lie

@dataclass
class ShardIndex:
    """Where each sample's JPEG lies in the webdataset shards of one split, its label and size.

    Offsets come from DALI's .idx files, labels and sizes from the per-sample table."""

    shards: list[str]  # tar paths
    shard_of: np.ndarray  # int32, per sample
    offset: np.ndarray  # int64, JPEG byte offset
    size: np.ndarray  # int64, JPEG byte count
    labels: np.ndarray  # int64
    heights: np.ndarray  # int64, stored image size
    widths: np.ndarray

    def __len__(self):
        return int(self.labels.size)

    @classmethod
    def load(cls, data, split) -> "ShardIndex":
        data = Path(data)
        if not is_converted(data):
            raise FastRSBError(f"{data} holds no converted dataset (no classes.json): run "
                               f"fastrsb convert SRC {data}")
        _refuse_old_format(data)
        tars = wds_shards(data, split)
        if not tars:
            raise FastRSBError(f"no webdataset shards in {wds_dir(data, split)}: run "
                               f"fastrsb convert SRC {data} --format dali")
        shard_of, offset, size = [], [], []
        for s, tar in enumerate(tars):
            try:
                o, n = read_offsets(tar.with_suffix(".idx"), "jpg")
            except (OSError, ValueError) as e:
                raise FastRSBError(f"{tar}: unreadable DALI index ({e}); rerun fastrsb convert") from e
            shard_of.append(np.full(o.size, s, np.int32))
            offset.append(o)
            size.append(n)
        offset, size = np.concatenate(offset), np.concatenate(size)
        table = samples_path(data, split)
        cols = read_sample_columns(table, ("label", "height", "width"))
        if cols["label"].size != offset.size:
            raise FastRSBError(f"{table} lists {cols['label'].size} samples but the shards hold {offset.size}; "
                               "rerun fastrsb convert")
        return cls([str(t) for t in tars], np.concatenate(shard_of), offset, size, cols["label"], cols["height"],
                   cols["width"])


class ShardBytes:
    """Reads JPEG bytes by sample index from memory-mapped shards (opened lazily, per process)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._maps = {}
        self._pid = None

    def __getstate__(self):
        return {"index": self.index}

    def __setstate__(self, state):
        self.index = state["index"]
        self._maps, self._pid = {}, None

    def _map(self, s: int):
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        mm = self._maps.get(s)
        if mm is None:
            with open(self.index.shards[s], "rb") as f:
                mm = self._maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def name(self, i: int) -> str:
        return f"sample {i} of {self.index.shards[int(self.index.shard_of[i])]}"

    def __call__(self, i: int) -> memoryview:
        ix = self.index
        o = int(ix.offset[i])
        return memoryview(self._map(int(ix.shard_of[i])))[o:o + int(ix.size[i])]

    def batch(self, ids: np.ndarray) -> list[np.ndarray]:
        """uint8 views of the JPEGs of `ids` (a batch: one lookup per array, not per sample and field)."""
        ix = self.index
        arrays = {}
        out = []
        for s, o, n in zip(ix.shard_of[ids].tolist(), ix.offset[ids].tolist(), ix.size[ids].tolist()):
            arr = arrays.get(s)
            if arr is None:
                arr = arrays[s] = np.frombuffer(self._map(s), dtype=np.uint8)
            out.append(arr[o:o + n])
        return out
