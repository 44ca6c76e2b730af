"""ImageNet as people download it, read in place: the official tars, Kaggle's copy, Hugging Face's copies.

`fastrsb convert DIR OUT` finds one of these layouts in DIR (`detect`) and lists each split as the
converter lists an ImageFolder split (`source.SplitScan`), so the result is the conversion of the
equivalent ImageFolder, sample for sample: each sample is named by the path it would have there,
`<class>/<file name>`, the samples of a class sorted as `source.scan_split` sorts files, and labels are
torchvision's (`torchvision.datasets.ImageNet`): positions in the sorted list of WNIDs.

- `imagenet-tars`, the files image-net.org serves: `ILSVRC2012_img_train.tar` (one tar per class,
  `<wnid>.tar`, each holding that class's JPEGs), `ILSVRC2012_img_val.tar` (50,000 JPEGs, flat) and
  `ILSVRC2012_devkit_t12.tar.gz`, whose `data/ILSVRC2012_validation_ground_truth.txt` gives, line n, the
  ILSVRC2012_ID of `ILSVRC2012_val_<n, 8 digits>.JPEG`, and `data/meta.mat` maps an ILSVRC2012_ID to its
  WNID (the synsets with num_children == 0 are the 1,000 classes; read as torchvision's
  `parse_meta_mat` reads it).
- `kaggle`, the ImageNet Object Localization Challenge: `ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG` (an
  ImageFolder split), a flat `ILSVRC/Data/CLS-LOC/val/`, and `LOC_val_solution.csv` (ImageId, then a
  PredictionString whose first token is the WNID).
- `hf-parquet`: parquet shards `train-*.parquet` and `validation-*.parquet` (in DIR or DIR/data), with
  an `image` struct {bytes, path} and an integer `label`.
- `webdataset`: tars `*-train-*.tar` and `*-validation-*.tar` holding `<key>.jpg` (or another image
  extension) and `<key>.cls` (the label as decimal text), as timm publishes ImageNet.

For the last two the labels are the given integers; class names come from a metadata file in DIR if
there is one (`classes.py`'s IMAGENET2012_CLASSES, read as a literal and never run, or
`LOC_synset_mapping.txt`), else from the parquet schema's ClassLabel names, else the integer is the
name. Names that are WNIDs are put in sorted order, labels following them, as torchvision's.

Nothing is extracted. Tars are indexed once (`tarfile`: each member's data offset and size; a nested
per-class tar is a byte range of the outer file, indexed the same way), then the converter's workers
read each sample with `os.pread` on their own file descriptors (`read_at`). A parquet sample is read
with its row group (one cached per process). Member names are keys, never paths: nothing is ever
joined onto a folder, and a name that is absolute or climbs with `..` is not read (listed in `skipped`),
as are hidden names (`.`*, e.g. macOS `._` files), links, devices and sparse members.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

from fastrsb.errors import FastRSBError, missing_extra

from .layout import find_classes, shown
from .source import HIDDEN, NOT_A_FILE, SourceFile, SplitScan, folder_order, is_inside, scan_split

OFFICIAL, KAGGLE, PARQUET, WEBDATASET = "imagenet-tars", "kaggle", "hf-parquet", "webdataset"
LAYOUTS = ("imagefolder", OFFICIAL, KAGGLE, PARQUET, WEBDATASET)

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
META = "ILSVRC2012_devkit_t12/data/meta.mat"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
KAGGLE_ROOT = ("ILSVRC", "Data", "CLS-LOC")
KAGGLE_SOLUTION, SYNSET_MAPPING, CLASSES_PY = "LOC_val_solution.csv", "LOC_synset_mapping.txt", "classes.py"
WNID = re.compile(r"n\d{8}")
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val"}  # shard prefix -> split
SHARD = re.compile(r"(?:.*-)?(train|validation|valid|val|test)-[^/]*\.(tar|parquet)")
MAX_METADATA_BYTES = 64 << 20  # devkit members and .cls labels read into memory (meta.mat: 2.2 MB)

UNSAFE = "unsafe member name (absolute, or with '..'): a name is never used as a path; not read"
LINK = "link inside the archive: not followed"
SPARSE = "sparse member: its bytes are not one range of the archive"
EXTRA = "imagenet"  # the setup.py extra holding pyarrow and scipy


# ------------------------------------------------------------------------------------------ names

def member_key(name: str) -> str | None:
    """An archive member's name as a key ('./' and repeated '/' dropped), or None when it is absolute or
    climbs with '..' (never a path: it is refused, not cleaned into one)."""
    if name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _shown_in(archive: str, name: str) -> str:
    return f"{archive}/{name}"


# ------------------------------------------------------------------------------------------- tars

class _Window(io.RawIOBase):
    """A read-only file over bytes [start, start + size) of an open file: a nested tar read in place."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + pos
        return self._pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._f.fileno(), n, self._start + self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _tar_members(fileobj, size: int, where: str):
    """(member, key or None, reason or None) for every member of an uncompressed tar, in archive order;
    reason: why it is not read (None: a regular file to read; for a folder, key and reason are None)."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
        for m in tar:
            if m.isdir():
                yield m, None, None
                continue
            key = member_key(m.name)
            if key is None:
                yield m, None, UNSAFE
            elif any(p.startswith(".") for p in key.split("/")):
                yield m, key, HIDDEN
            elif m.issym() or m.islnk():
                yield m, key, LINK
            elif not m.isreg():
                yield m, key, NOT_A_FILE
            elif m.issparse():
                yield m, key, SPARSE
            elif m.offset_data + m.size > size:
                raise FastRSBError(f"{where}: ends inside member {shown(m.name)} (truncated): download it again")
            else:
                yield m, key, None
    except (tarfile.TarError, EOFError) as e:
        raise FastRSBError(f"{where}: not a readable tar ({e}): download it again") from None


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo, where: str) -> bytes:
    if m.size > MAX_METADATA_BYTES:
        raise FastRSBError(f"{where}: {m.size / 1e6:.0f} MB, more than a label file can be "
                           f"({MAX_METADATA_BYTES >> 20} MiB); download it again")
    return tar.extractfile(m).read()


# ------------------------------------------------------------------------------------ the reader

_fds: "OrderedDict[str, int]" = OrderedDict()  # per process: open archives, least recently used first
_MAX_FDS = 64
_row_group: dict = {}  # per process: the last parquet row group read, {(path, row group): [bytes]}


def _fd(path: str) -> int:
    fd = _fds.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if len(_fds) >= _MAX_FDS:
            os.close(_fds.popitem(last=False)[1])
    _fds[path] = fd
    return fd


def read_at(at: tuple) -> bytes:
    """The bytes of a sample an archive holds: ("range", archive, offset, size) or ("row", parquet, row
    group, row). OSError when they cannot be read (the converter names the sample and the archive)."""
    if at[0] == "range":
        _, path, offset, size = at
        data = os.pread(_fd(path), size, offset)
        if len(data) != size:
            raise OSError(f"{path} ends before the member does (truncated since it was indexed)")
        return data
    _, path, group, row = at
    rows = _row_group.get((path, group))
    if rows is None:
        pq = _pyarrow()
        table = pq.ParquetFile(path).read_row_group(group, columns=["image"])
        rows = table.column("image").combine_chunks().field("bytes").to_pylist()
        _row_group.clear()  # one row group per process: a 100-image group of ImageNet is ~11 MB
        _row_group[(path, group)] = rows
    return rows[row] or b""


def where_name(at) -> str:
    """The file a job reads, for messages: the split folder, or the archive."""
    return at if isinstance(at, str) else at[1]


# --------------------------------------------------------------------------------- class names

def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("pyarrow", EXTRA) from None
    return pq


def _scipy_io():
    try:
        import scipy.io
    except ImportError:
        raise missing_extra("scipy", EXTRA) from None
    return scipy.io


def _classes_py(path: Path) -> list[str]:
    """The keys of IMAGENET2012_CLASSES in Hugging Face's classes.py, read as a literal (never run)."""
    try:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [getattr(t, "id", "") for t in getattr(node, "targets", ())]
            if isinstance(node, ast.Assign) and "IMAGENET2012_CLASSES" in names:
                value = node.value
                if isinstance(value, ast.Call) and value.args:  # OrderedDict({...}) or OrderedDict([...])
                    value = value.args[0]
                literal = ast.literal_eval(value)
                return [str(k) for k in (literal.keys() if isinstance(literal, dict) else (k for k, _ in literal))]
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise FastRSBError(f"{path}: unreadable ({e}); delete it (the labels are then the integers) or "
                           "download it again") from None
    raise FastRSBError(f"{path}: no IMAGENET2012_CLASSES inside; delete it or download it again")


def _synset_mapping(path: Path) -> list[str]:
    """WNIDs of LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca'), in its (label) order."""
    try:
        return [line.split(maxsplit=1)[0] for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise FastRSBError(f"{path}: unreadable ({e.strerror})") from None


def _metadata_names(root: Path) -> tuple[list[str] | None, str]:
    for name, read in ((CLASSES_PY, _classes_py), (SYNSET_MAPPING, _synset_mapping)):
        if (root / name).is_file():
            return read(root / name), str(root / name)
    return None, ""


def _names_and_order(names: list[str], where: str) -> tuple[list[str], list[int]]:
    """(classes.json's list, the new label of each given label): WNIDs sorted as torchvision sorts them."""
    if len(set(names)) != len(names):
        raise FastRSBError(f"{where}: a class name is listed twice; download it again")
    if all(WNID.fullmatch(n) for n in names):
        ordered = sorted(names)
        position = {n: i for i, n in enumerate(ordered)}
        return ordered, [position[n] for n in names]
    return list(names), list(range(len(names)))


# ----------------------------------------------------------------------------------------- layouts

class Layout:
    """A dataset as downloaded: its splits, each split's class names, and its `SplitScan`."""

    name = ""

    def __init__(self, root: Path):
        self.root = root
        self.splits: dict[str, str] = {}  # split -> what it is read from (for messages)

    def describe(self) -> str:
        return f"{self.name} ({'; '.join(f'{s}: {w}' for s, w in self.splits.items())})"

    def classes(self, split: str) -> list[str]:
        raise NotImplementedError

    def scan(self, split: str, classes: list[str]) -> SplitScan:
        raise NotImplementedError

    def folders(self) -> dict[str, Path]:
        """Folders the converter reads file by file (OUT must not overlap them)."""
        return {}


def _imagefolder_order(key: str) -> tuple:
    top, _, rest = key.partition("/")  # top: a class, or a file beside the classes (label -1)
    return (top, folder_order(rest) if rest else ())


def _labelled(files: list[tuple[str, int, tuple | None]]) -> list[SourceFile]:
    """Samples sorted as `scan_split` lists the equivalent ImageFolder: by class (and files beside the
    classes, by name), then as it walks a class folder."""
    files.sort(key=lambda f: _imagefolder_order(f[0]))
    return [SourceFile(key, label, at) for key, label, at in files]


def _unknown_class(wnid: str, where: str, classes: list[str]) -> FastRSBError:
    return FastRSBError(f"{where}: class {shown(wnid)} is not among the {len(classes)} classes of the train split "
                        "(or OUT/classes.json); give every split the same classes, or convert into a new OUT")


class OfficialTars(Layout):
    name = OFFICIAL

    def __init__(self, root: Path):
        super().__init__(root)
        if (root / TRAIN_TAR).is_file():
            self.splits["train"] = str(root / TRAIN_TAR)
        if (root / VAL_TAR).is_file():
            self.splits["val"] = f"{root / VAL_TAR} + {root / DEVKIT}"
        self._outer = None
        self._val = None

    # train: a tar of per-class tars
    def _train_members(self) -> list:
        if self._outer is None:
            path = self.root / TRAIN_TAR
            with open(path, "rb") as f:
                self._outer = list(_tar_members(f, path.stat().st_size, str(path)))
        return self._outer

    @staticmethod
    def _class_tar(key: str | None) -> str | None:
        return key[:-4] if key and "/" not in key and key.endswith(".tar") and len(key) > 4 else None

    def classes(self, split: str) -> list[str]:
        if split == "train":
            return sorted(w for m, key, reason in self._train_members() if reason is None
                          and (w := self._class_tar(key)) and not w.startswith("."))
        return sorted({wnid for _, wnid, _ in self._val_images()[0]})

    def _scan_train(self, classes: list[str]) -> SplitScan:
        path = self.root / TRAIN_TAR
        scan = SplitScan("train", path, layout=self.name, origin=str(path), inputs=(str(path),))
        index = {c: i for i, c in enumerate(classes)}
        files = []
        with open(path, "rb") as f:
            for outer, key, reason in self._train_members():
                if reason:
                    scan.skipped.append({"path": _shown_in(TRAIN_TAR, key or outer.name), "reason": reason})
                    continue
                wnid = self._class_tar(key)
                if key is None:
                    continue  # a folder
                if wnid is None:  # a file outside every class tar: named among the non-image files
                    files.append((key, -1, None))
                    continue
                if wnid not in index:
                    raise _unknown_class(wnid, f"{path}: {key}", classes)
                where = f"{path}: member {key}"
                count = 0
                for inner, name, why in _tar_members(_Window(f, outer.offset_data, outer.size), outer.size, where):
                    if why:
                        scan.skipped.append({"path": _shown_in(f"{TRAIN_TAR}/{key}", name or inner.name),
                                             "reason": why})
                    elif name is not None:
                        files.append((f"{wnid}/{name}", index[wnid],
                                      ("range", str(path), outer.offset_data + inner.offset_data, inner.size)))
                        count += 1
                if not count:
                    raise FastRSBError(f"{where}: empty class tar (no file that is read); download "
                                       f"{TRAIN_TAR} again")
        scan.files = _labelled(files)
        return scan

    # val: a flat tar, labels from the devkit
    def _devkit(self) -> list[str]:
        """The WNID of each ground-truth line (line n: ILSVRC2012_val_<n>.JPEG), via meta.mat."""
        path = self.root / DEVKIT
        if not path.is_file():
            raise FastRSBError(f"{path}: missing; {VAL_TAR} has its labels in the devkit: download {DEVKIT} "
                               "from image-net.org into the same folder")
        found = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar:
                    if m.isreg() and member_key(m.name) in (GROUND_TRUTH, META):
                        found[member_key(m.name)] = _read_member(tar, m, f"{path}: {m.name}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FastRSBError(f"{path}: not a readable .tar.gz ({e}): download it again") from None
        for name in (GROUND_TRUTH, META):
            if name not in found:
                raise FastRSBError(f"{path}: no {name} inside; is it the ILSVRC2012 devkit (t12)? download it again")
        sio = _scipy_io()
        try:
            synsets = sio.loadmat(io.BytesIO(found[META]), squeeze_me=True)["synsets"]
            # torchvision's parse_meta_mat: fields ILSVRC2012_ID, WNID, words, ..., num_children (the 5th)
            leaves = [s for s in synsets if int(s[4]) == 0]
            id_to_wnid = {int(s[0]): str(s[1]) for s in leaves}
        except (ValueError, KeyError, IndexError, TypeError, NotImplementedError) as e:
            raise FastRSBError(f"{path}: {META} unreadable ({type(e).__name__}: {e}); download it again") from None
        wnids = []
        for n, line in enumerate(found[GROUND_TRUTH].decode("ascii", "replace").split(), 1):
            if not line.isdigit() or int(line) not in id_to_wnid:
                raise FastRSBError(f"{path}: line {n} of {GROUND_TRUTH} is {line!r}, not an ILSVRC2012_ID of the "
                                   f"{len(id_to_wnid)} classes in {META}; download it again")
            wnids.append(id_to_wnid[int(line)])
        return wnids

    def _val_images(self) -> tuple[list, list]:
        """([(member, wnid, at)], skipped) of the val tar, in archive order."""
        if self._val is None:
            path = self.root / VAL_TAR
            wnids = self._devkit()
            images, skipped, seen = [], [], set()
            with open(path, "rb") as f:
                for m, key, reason in _tar_members(f, path.stat().st_size, str(path)):
                    if key is None and reason is None:
                        continue
                    match = VAL_NAME.fullmatch(key) if key else None
                    if reason is None and match is None:
                        reason = "not a validation image name (ILSVRC2012_val_NNNNNNNN.JPEG): no ground-truth label"
                    elif reason is None and not 1 <= int(match.group(1)) <= len(wnids):
                        reason = f"no line {int(match.group(1))} in the devkit's ground truth ({len(wnids)} lines)"
                    if reason:
                        skipped.append({"path": _shown_in(VAL_TAR, key or m.name), "reason": reason})
                        continue
                    n = int(match.group(1))
                    seen.add(n)
                    images.append((key, wnids[n - 1], ("range", str(path), m.offset_data, m.size)))
            if len(seen) != len(wnids):
                missing = next(n for n in range(1, len(wnids) + 1) if n not in seen)
                raise FastRSBError(f"{path}: holds {len(seen)} of the {len(wnids)} validation images the devkit lists "
                                   f"(ILSVRC2012_val_{missing:08d}.JPEG is missing): download {VAL_TAR} again")
            self._val = images, skipped
        return self._val

    def scan(self, split: str, classes: list[str]) -> SplitScan:
        if split == "train":
            return self._scan_train(classes)
        path = self.root / VAL_TAR
        scan = SplitScan("val", path, layout=self.name, origin=str(path), inputs=(str(path),))
        images, scan.skipped = self._val_images()
        index = {c: i for i, c in enumerate(classes)}
        for key, wnid, _ in images:
            if wnid not in index:
                raise _unknown_class(wnid, f"{path}: {key} (label from {DEVKIT})", classes)
        scan.files = _labelled([(f"{wnid}/{key}", index[wnid], at) for key, wnid, at in images])
        return scan


class Kaggle(Layout):
    name = KAGGLE

    def __init__(self, root: Path):
        super().__init__(root)
        self.base = root.joinpath(*KAGGLE_ROOT)
        if (self.base / "train").is_dir():
            self.splits["train"] = str(self.base / "train")
        if (self.base / "val").is_dir():
            self.splits["val"] = f"{self.base / 'val'} + {root / KAGGLE_SOLUTION}"
        self._solution = None

    def folders(self) -> dict[str, Path]:
        return {split: self.base / split for split in self.splits}

    def _labels(self) -> dict[str, str]:
        """ImageId -> WNID from LOC_val_solution.csv."""
        if self._solution is None:
            path = self.root / KAGGLE_SOLUTION
            if not path.is_file():
                raise FastRSBError(f"{path}: missing; Kaggle's val images have their labels there: download it "
                                   "from the competition's data page into the same folder")
            try:
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
                self._solution = {r["ImageId"]: r["PredictionString"].split()[0] for r in rows}
            except (OSError, KeyError, IndexError, AttributeError, csv.Error) as e:
                raise FastRSBError(f"{path}: unreadable ({type(e).__name__}: {e}); expected the columns "
                                   "ImageId,PredictionString: download it again") from None
        return self._solution

    def classes(self, split: str) -> list[str]:
        if split == "train":
            return find_classes(self.base / "train")
        return sorted(set(self._labels().values()))

    def scan(self, split: str, classes: list[str]) -> SplitScan:
        folder = self.base / split
        if split == "train":
            scan = scan_split("train", folder, classes, self.root)
            scan.layout = self.name
            return scan
        labels, index = self._labels(), {c: i for i, c in enumerate(classes)}
        scan = SplitScan("val", folder, layout=self.name, origin=str(folder))
        files, found = [], set()
        root_real = Path(os.path.realpath(self.root))
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = entry.name
            reason = None
            if name.startswith("."):
                reason = HIDDEN
            elif entry.is_symlink() and not is_inside(Path(os.path.realpath(entry.path)), root_real):
                reason = "symlink that leads outside DIR (or is broken): not followed (copy the file into DIR)"
            elif entry.is_dir():
                reason = "a folder inside the flat val folder: not read"
            elif not entry.is_file():
                reason = NOT_A_FILE
            elif name.rsplit(".", 1)[0] not in labels:
                reason = f"no row in {KAGGLE_SOLUTION}: no label"
            if reason:
                scan.skipped.append({"path": os.fsdecode(name), "reason": reason})
                continue
            wnid = labels[name.rsplit(".", 1)[0]]
            if wnid not in index:
                raise _unknown_class(wnid, f"{self.root / KAGGLE_SOLUTION}: {name}", classes)
            found.add(name.rsplit(".", 1)[0])
            files.append((f"{wnid}/{name}", index[wnid], ("file", entry.path)))
        if len(found) != len(labels):
            missing = sorted(set(labels) - found)
            raise FastRSBError(f"{folder}: lacks {len(missing)} of the images {KAGGLE_SOLUTION} lists (first: "
                               f"{missing[0]}): download the val folder again")
        scan.files = _labelled(files)
        return scan


class _Integers(Layout):
    """Shards with integer labels: Hugging Face's parquet and timm's webdataset tars."""

    suffix = ""

    def __init__(self, root: Path):
        super().__init__(root)
        self.shards: dict[str, list[Path]] = {}
        self.unlabelled: list[Path] = []
        for folder in (root, root / "data"):
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    match = SHARD.fullmatch(path.name)
                    if match and match.group(2) == self.suffix and path.is_file():
                        if match.group(1) == "test":  # ImageNet's test labels were never published
                            self.unlabelled.append(path)
                        else:
                            self.shards.setdefault(SPLIT_NAMES[match.group(1)], []).append(path)
        for split, paths in self.shards.items():
            self.splits[split] = f"{len(paths)} .{self.suffix} shards in {paths[0].parent}"
        self._rows: dict[str, tuple] = {}
        self._names = None

    def describe(self) -> str:
        test = f"; not converted, without labels: {len(self.unlabelled)} test shards" if self.unlabelled else ""
        return super().describe()[:-1] + test + ")"

    def _samples(self, split: str) -> tuple[list, list]:
        """([(name, label, at)], skipped) of a split's shards."""
        raise NotImplementedError

    def _split_rows(self, split: str) -> tuple[list, list]:
        if split not in self._rows:
            self._rows[split] = self._samples(split)
        return self._rows[split]

    def _given_names(self) -> tuple[list[str] | None, str]:
        return _metadata_names(self.root)

    def _class_names(self) -> tuple[list[str], list[int] | None, str]:
        """(names in classes.json order, new label of each given label (None: unchanged), where they come from)."""
        if self._names is None:
            names, where = self._given_names()
            if names is None:
                top = max((lab for s in self.shards for _, lab, _ in self._split_rows(s)[0]), default=-1)
                self._names = [str(i) for i in range(top + 1)], None, "the integer labels"
            else:
                ordered, relabel = _names_and_order(names, where)
                self._names = ordered, relabel, where
        return self._names

    def classes(self, split: str) -> list[str]:
        names, relabel, _ = self._class_names()
        present = {lab for _, lab, _ in self._split_rows(split)[0]}
        too_big = [lab for lab in present if lab >= len(names)]
        if too_big:
            raise FastRSBError(f"{self.splits[split]}: label {max(too_big)} but {self._class_names()[2]} names "
                               f"{len(names)} classes; remove or fix the metadata file")
        if split == "train" or relabel is None:
            return names
        return sorted({names[relabel[lab]] for lab in present}, key=names.index)

    def scan(self, split: str, classes: list[str]) -> SplitScan:
        names, relabel, _ = self._class_names()
        index = {c: i for i, c in enumerate(classes)}
        rows, skipped = self._split_rows(split)
        files, seen = [], {}
        for name, label, at in rows:
            cls = names[relabel[label] if relabel else label]
            if cls not in index:
                raise _unknown_class(cls, f"{at[1]}: {name}", classes)
            key = f"{cls}/{name}"
            if key in seen:
                raise FastRSBError(f"{at[1]}: sample {shown(name)} of class {cls} appears twice (also in {seen[key]}); "
                                   "remove the duplicate shard")
            seen[key] = at[1]
            files.append((key, index[cls], at))
        first = self.shards[split][0]
        scan = SplitScan(split, first, skipped=skipped, layout=self.name,
                         origin=f"{first}" + (f" (and {len(self.shards[split]) - 1} more shards)"
                                              if len(self.shards[split]) > 1 else ""),
                         inputs=tuple(map(str, self.shards[split])))
        scan.files = _labelled(files)
        return scan


class Parquet(_Integers):
    name, suffix = PARQUET, "parquet"

    def _given_names(self):
        names, where = _metadata_names(self.root)
        if names is not None:
            return names, where
        pq = _pyarrow()
        for paths in self.shards.values():
            meta = pq.ParquetFile(paths[0]).schema_arrow.metadata or {}
            try:  # the datasets library's features, kept in the schema: label is a ClassLabel with names
                names = json.loads(meta[b"huggingface"])["info"]["features"]["label"]["names"]
                return [str(n) for n in names], f"{paths[0]} (ClassLabel names)"
            except (KeyError, TypeError, ValueError):
                pass
        return None, ""

    def _samples(self, split):
        pq = _pyarrow()
        rows, skipped = [], []
        for path in self.shards[split]:
            try:
                pf = pq.ParquetFile(path)
                schema = pf.schema_arrow
                if "label" not in schema.names or "image" not in schema.names or \
                        schema.field("image").type.num_fields < 2:
                    raise FastRSBError(f"{path}: no `image` struct {{bytes, path}} and `label` column (it has: "
                                       f"{', '.join(schema.names)}); is it an ImageNet shard from Hugging Face?")
                for group in range(pf.metadata.num_row_groups):
                    table = pf.read_row_group(group, columns=["image.path", "label"]).to_pydict()
                    for row, (image, label) in enumerate(zip(table["image"], table["label"])):
                        where = f"{path.name}: row group {group}, row {row}"
                        given = (image or {}).get("path")
                        name = member_key(given) if given else None
                        if name is None or any(p.startswith(".") for p in name.split("/")):
                            name = f"{path.stem}-{group:05d}-{row:05d}"  # no usable name: its place
                        if label is None or label < 0:
                            skipped.append({"path": where, "reason": f"no label ({label}; a test split has none)"})
                        else:
                            rows.append((name, int(label), ("row", str(path), group, row)))
            except FastRSBError:
                raise
            except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) on a damaged file
                raise FastRSBError(f"{path}: unreadable parquet ({type(e).__name__}: {e}); download it again") from None
        return rows, skipped


class WebDataset(_Integers):
    name, suffix = WEBDATASET, "tar"

    def _samples(self, split):
        rows, skipped = [], []
        for path in self.shards[split]:
            samples: dict[str, dict] = {}  # webdataset key (name up to the first '.' of the basename) -> members
            with open(path, "rb") as f:
                tar_size = path.stat().st_size
                for m, key, reason in _tar_members(f, tar_size, str(path)):
                    if reason:
                        skipped.append({"path": _shown_in(path.name, key or m.name), "reason": reason})
                        continue
                    if key is None:
                        continue
                    folder, _, base = key.rpartition("/")
                    stem, dot, extension = base.partition(".")
                    sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                    if extension == "cls":
                        text = os.pread(f.fileno(), min(m.size, 64), m.offset_data).strip()
                        sample["cls"] = int(text) if text.isdigit() else text.decode("ascii", "replace")
                    elif extension != "json":  # json: per-sample metadata, not a file of the dataset
                        sample.setdefault("files", []).append((key, ("range", str(path), m.offset_data, m.size)))
            for stem, sample in samples.items():
                label = sample.get("cls")
                for key, at in sample.get("files", []):
                    if isinstance(label, int):
                        rows.append((key, label, at))
                    else:
                        why = "no <key>.cls label member" if label is None else f"<key>.cls is {label!r}, not a label"
                        skipped.append({"path": _shown_in(path.name, key), "reason": why})
        return rows, skipped


ARCHIVE_LAYOUTS = (OfficialTars, Kaggle, Parquet, WebDataset)


def detect(root: Path) -> list[Layout]:
    """The archive layouts DIR holds (any splits found), in `ARCHIVE_LAYOUTS` order."""
    return [layout for cls in ARCHIVE_LAYOUTS if (layout := cls(root)).splits]
