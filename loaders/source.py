"""What a split of a source ImageFolder holds, in the one order every reader of it uses.

`fastrsb convert` and the PIL backend over a raw ImageFolder both list a split through `scan_split`, so
they read the same files in the same order with the same labels (tests/test_convert.py checks it):

- class folders are the non-hidden directories directly below the split (`layout.find_classes`), labels
  their positions in sorted order, as torchvision's ImageFolder;
- below a class folder, recursively, in sorted order of names: a folder's files first, then its
  sub-folders, each walked the same way (depth first);
- a file directly in the split folder (outside every class folder) gets label -1: the converter lists it
  among its non-image files, a loader does not read it;
- not read, and listed in `skipped` with the reason: hidden names (`.`*), broken symlinks, symlinks that
  lead outside SRC (a symlink inside SRC is followed, once: a folder reached twice is a symlink loop),
  fifos, sockets and devices.

A class folder outside the given class list, an empty class folder and a class folder that is a symlink
out of SRC are errors that name the folder and the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fastrsb.errors import FastRSBError

from .layout import find_classes, shown

HIDDEN = "hidden (name starts with '.')"
NOT_A_FILE = "not a regular file (fifo, socket or device)"


@dataclass(frozen=True, slots=True)
class SourceFile:
    relpath: str  # relative to the split folder (a str from os.fsdecode: any bytes survive); for a sample
    #               read from an archive, the path it would have in the equivalent ImageFolder: <class>/<name>
    label: int  # -1: not inside a class folder
    at: tuple | None = None  # None: the file split folder/relpath; else where its bytes lie (`imagenet.read_at`)


@dataclass
class SplitScan:
    name: str
    folder: Path  # the split folder, or the archive (or first shard) the split is read from
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: entries not read
    layout: str = "imagefolder"  # the source layout (`imagenet.LAYOUTS`), recorded in the manifest
    origin: str = ""  # what the manifest records as the source (default: the split folder)
    inputs: tuple[str, ...] = ()  # the files read (archives), for sizes in messages; () for a folder


def folder_order(relpath: str) -> tuple:
    """Sort key giving the order `scan_split` walks a class folder in: at each level its files (sorted by
    name) before its sub-folders (each walked the same way); for samples named by archive keys."""
    *folders, name = relpath.split("/")
    return (*((1, f) for f in folders), (0, name))


def is_inside(path: Path, root: Path) -> bool:
    """`path` is `root` or lies below it (both resolved by the caller)."""
    return path == root or root in path.parents


def _symlink_verdict(path: str, root: Path) -> str | None:
    """The reason to skip a symlink, or None: it is followed only when it stays inside SRC."""
    if not os.path.exists(path):
        return f"broken symlink (to {shown(os.readlink(path))})"
    target = Path(os.path.realpath(path))
    if not is_inside(target, root):
        return f"symlink to {shown(str(target))}, outside SRC: not followed (copy the file into SRC)"
    return None


def _walk_class(folder: Path, scan: SplitScan, src_root: Path, label: int, seen: set) -> int:
    """Append the files below one class folder in (files, then sub-folders) sorted order; returns their number."""
    count = 0
    subdirs = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        rel = os.path.relpath(entry.path, scan.folder)
        if entry.name.startswith("."):
            scan.skipped.append({"path": rel, "reason": HIDDEN})
            continue
        if entry.is_symlink():
            reason = _symlink_verdict(entry.path, src_root)
            if reason:
                scan.skipped.append({"path": rel, "reason": reason})
                continue
        if entry.is_dir():
            real = os.path.realpath(entry.path)
            if real in seen:
                scan.skipped.append({"path": rel, "reason": f"folder already scanned ({shown(real)}): a symlink loop"})
                continue
            seen.add(real)
            subdirs.append(entry)
        elif entry.is_file():
            scan.files.append(SourceFile(rel, label))
            count += 1
        else:
            scan.skipped.append({"path": rel, "reason": NOT_A_FILE})
    for entry in subdirs:
        count += _walk_class(Path(entry.path), scan, src_root, label, seen)
    return count


def scan_split(name: str, folder, classes: list[str] | None = None, src_root=None) -> SplitScan:
    """Every entry below a split folder: files sorted by (class, path), files outside class folders
    with label -1, and what is not read with the reason.

    `classes`: the label list (default: the split's own class folders, `find_classes`); a class folder
    not in it is an error. `src_root`: the SRC folder symlinks may lead into (default: the split folder)."""
    folder = Path(folder)
    classes = find_classes(folder) if classes is None else classes
    src_root = Path(os.path.realpath(folder if src_root is None else src_root))
    index = {c: i for i, c in enumerate(classes)}
    scan = SplitScan(name, folder)
    seen = {os.path.realpath(folder)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            scan.skipped.append({"path": entry.name, "reason": HIDDEN})
            continue
        if entry.is_symlink():
            reason = _symlink_verdict(entry.path, src_root)
            if reason:
                if os.path.isdir(entry.path):
                    raise FastRSBError(f"{shown(entry.path)}: class folder is a {reason.split(':')[0]}; fastrsb "
                                       "reads only what lies inside SRC: copy or move the class folder into SRC")
                scan.skipped.append({"path": entry.name, "reason": reason})
                continue
        if entry.is_file():
            scan.files.append(SourceFile(entry.name, -1))
            continue
        if not entry.is_dir():
            scan.skipped.append({"path": entry.name, "reason": NOT_A_FILE})
            continue
        if entry.name not in index:
            raise FastRSBError(
                f"{shown(entry.path)}: class folder not among the {len(classes)} classes of the train split "
                f"(or OUT/classes.json); give every split the same class folders"
            )
        seen.add(os.path.realpath(entry.path))
        if not _walk_class(Path(entry.path), scan, src_root, index[entry.name], seen):
            raise FastRSBError(f"{shown(entry.path)}: empty class folder (no file that is read); add its images "
                               "or remove the folder")
    return scan
