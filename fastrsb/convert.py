"""`fastrsb convert`: an ImageFolder dataset (or ImageNet as downloaded) to FFCV .beton and DALI webdataset shards.

Layout written: `fastrsb/loaders/layout.py` (the one module that knows the paths). How it runs:

1. Scan and check every split before anything is written (`loaders/source.py`, the scan the PIL
   loader over a raw ImageFolder shares): SRC/<split>/<class>/** (recursively, like torchvision's
   ImageFolder), labels from the sorted class-folder names (kept in OUT/classes.json, so splits
   converted later get the same labels; val's classes must be among train's, and a class listed
   there must still have its folder). Entries that are not read are listed in the manifest's
   `skipped` with the reason: hidden names (`.`*), broken symlinks, symlinks that lead outside SRC
   (a symlink inside SRC is followed, once), fifos and devices. OUT must not overlap a split folder.
   SRC may instead hold ImageNet as downloaded (the official tars, Kaggle's copy, Hugging Face's
   parquet or webdataset shards): `loaders/imagenet.py` lists each split as the equivalent
   ImageFolder's, reading the archives in place, and the manifest records the layout it read.
2. Shards, over `workers` processes: a JPEG every backend decodes as it is (baseline or progressive,
   RGB or grayscale, no EXIF rotation; train: within `max_side`) keeps its original bytes; every
   other file is decoded by `fastrsb.images` (RGB, EXIF orientation, train's max side bounded) and
   re-encoded as JPEG the way FFCV encodes, or listed as rejected / non-image with its reason. A
   shard is written under temporary names and renamed when complete; its record (`.json`, renamed
   last) marks it done.
3. The beton, from the shard bytes, through ffcv's DatasetWriter (`loaders/beton.py`), in this
   process (no writer child to die unseen), to a temporary name renamed when complete.
4. samples.jsonl (per sample: kept or re-encoded and why, the source's sha256) and manifest.json.

Formats accumulate: converting again with another `--format` adds it and never removes one already
made (the state file lists them). Killed at any moment (kill -9, Ctrl-C, a full disk) and run again
with the same options, it redoes only unfinished shards and an unfinished beton, and ends with the
same bytes as an uninterrupted run; the same input and options give byte-identical output (for the
same library versions, which the manifest records).
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import runmeta
from .errors import FastRSBError, missing_extra
from .lock import OutputLock
from .runmeta import write_atomic
from .loaders import imagenet, layout, wds
from .loaders.imagenet import read_at, where_name
from .loaders.layout import find_classes, shown
from .loaders.source import SplitScan, is_inside, scan_split

FORMATS = ("beton", "dali")
FORMAT_VERSION = layout.FORMAT_VERSION


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions(with_ffcv: bool) -> dict:
    """The libraries that shape the output bytes: runmeta.versions of those alone (no torch, no device,
    so the manifest does not change with what else the process imported)."""
    return runmeta.versions(only=("numpy", "pillow", "opencv-python", "opencv-python-headless")
                            + (("ffcv",) if with_ffcv else ()))


# ---------------------------------------------------------------------------------------- splits

def _looks_like_split(folder: Path) -> bool:
    return folder.is_dir() and bool(find_classes(folder))


def resolve_splits(src: Path, split: str | None) -> dict[str, Path]:
    if not src.exists():
        raise FastRSBError(f"{src}: no such folder; give the dataset root that holds train/ and val/")
    if not src.is_dir():
        raise FastRSBError(f"{src}: not a folder; give the dataset root that holds train/ and val/")
    if not any(True for _ in os.scandir(src)):
        raise FastRSBError(f"{src}: empty folder, no train/ or val/ inside; give the dataset root that holds "
                           "train/<class>/<image> and "
                           "val/<class>/<image>")
    if split is not None:
        if not split or "/" in split or split.startswith("."):
            raise FastRSBError(f"--split {split!r}: give a plain name such as train or val")
        held = [name for name in ("train", "val") if _looks_like_split(src / name)]
        if held:
            raise FastRSBError(
                f"--split {split}: {src} holds {' and '.join(f'{h}/' for h in held)} with class folders, so "
                f"--split would make {', '.join(held)} classes: drop --split to convert every split, or give "
                f"{src / held[0]} as SRC")
        if not find_classes(src):
            raise FastRSBError(f"{src}: no class folders inside; --split expects SRC to hold one split's class folders")
        return {split: src}
    splits = {name: src / name for name in ("train", "val") if (src / name).is_dir()}
    if not splits:
        hint = (" It holds class folders directly: pass --split train (or val)." if find_classes(src) else "")
        raise FastRSBError(f"{src}: no train/ or val/ folder with class folders inside.{hint}")
    for name, folder in splits.items():
        if not find_classes(folder):
            raise FastRSBError(f"{folder}: no class folders inside (expected {folder}/<class>/<image>)")
    return splits


class _Folders(imagenet.Layout):
    """An ImageFolder: SRC/train and SRC/val class folders (or one split's with --split)."""

    name = "imagefolder"

    def __init__(self, src: Path, split: str | None):
        super().__init__(src)
        self.paths = resolve_splits(src, split)
        self.splits = {name: str(folder) for name, folder in self.paths.items()}

    def classes(self, split: str) -> list[str]:
        return find_classes(self.paths[split])

    def scan(self, split: str, classes: list[str]) -> SplitScan:
        return scan_split(split, self.paths[split], classes, Path(os.path.realpath(self.root)))

    def folders(self) -> dict[str, Path]:
        return self.paths


def find_source(src: Path, split: str | None, layout_name: str = "auto") -> imagenet.Layout:
    """The layout SRC holds: an ImageFolder, or ImageNet as downloaded (`loaders/imagenet.py`); one only,
    or `layout_name` picks it."""
    if layout_name not in ("auto", *imagenet.LAYOUTS):
        raise FastRSBError(f"--layout {layout_name}: choose auto or one of {', '.join(imagenet.LAYOUTS)}")
    if layout_name == "imagefolder" or split is not None or not src.is_dir():
        return _Folders(src, split)  # its checks name what is wrong with SRC
    found = imagenet.detect(src)
    if any(_looks_like_split(src / name) for name in ("train", "val")):
        found.append(_Folders(src, None))
    if layout_name != "auto":
        picked = [f for f in found if f.name == layout_name]
        if not picked:
            raise FastRSBError(f"--layout {layout_name}: {src} holds no such dataset; see the README's \"ImageNet as "
                               "downloaded\" for the files each layout needs")
        return picked[0]
    if len(found) > 1:
        raise FastRSBError(f"{src} holds several datasets: {'; '.join(f.describe() for f in found)}; pick one with "
                           f"--layout {' or --layout '.join(f.name for f in found)}")
    return found[0] if found else _Folders(src, None)


def _check_no_overlap(out: Path, splits: dict[str, Path]) -> None:
    """OUT inside a split folder would be scanned as a class; a split inside OUT would be written over."""
    out_real = Path(os.path.realpath(out))
    for name, folder in splits.items():
        real = Path(os.path.realpath(folder))
        if is_inside(out_real, real):
            raise FastRSBError(f"OUT {out} lies inside the {name} split {folder}: it would be read as a class "
                               "folder; choose an OUT outside the source folders")
        if is_inside(real, out_real):
            raise FastRSBError(f"the {name} split {folder} lies inside OUT {out}: converting would write into the "
                               "source; choose an OUT outside the source folders")


def _check_classes(out: Path, splits: dict[str, str], found: dict[str, list[str]]) -> list[str]:
    """The class list of this conversion, checked against every split (`splits`: what each is read from,
    `found`: its classes) and OUT/classes.json; writes nothing."""
    if "train" in found:
        for name, classes in found.items():
            extra = [c for c in classes if c not in set(found["train"])]
            if extra:
                raise FastRSBError(
                    f"{splits[name]} has classes that {splits['train']} lacks: {', '.join(map(shown, extra[:5]))}"
                    f"{' ...' if len(extra) > 5 else ''}; a model trained on train cannot predict them: add them to "
                    "train or remove them from " + name)
    source = found.get("train") or found[next(iter(found))]
    path = layout.classes_path(out)
    if not path.exists():
        return source
    classes = layout.read_classes(out)
    new = [c for c in source if c not in set(classes)]
    if new:
        raise FastRSBError(
            f"{path} lists {len(classes)} classes without {', '.join(map(shown, new[:5]))}; converting into this OUT "
            "would change labels: use a new OUT folder")
    if "train" in found:
        stale = [c for c in classes if c not in set(found["train"])]
        if stale:
            raise FastRSBError(
                f"{path} lists class {shown(stale[0])}{f' (and {len(stale) - 1} more)' if len(stale) > 1 else ''}, "
                f"which {splits['train']} no longer has: its label would hold no image. Restore the folder, or "
                "convert into a new OUT folder (or delete OUT first)")
    return classes


# ----------------------------------------------------------------------------------------- workers

def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}"


def prepare_image(job: tuple) -> tuple:
    """(where, relpath, label, max_side, quality, keep_jpeg) -> (Prepared, None) or (None, (reason, non_image)).

    where: the split folder holding relpath, or where an archive holds the sample (`SourceFile.at`)."""
    from .images import BadImage, prepare, prepare_bytes

    where, relpath, label, max_side, quality, keep_jpeg = job
    try:
        if label < 0:
            raise BadImage("not inside a class folder", non_image=True)
        if isinstance(where, str):
            return prepare(Path(where) / relpath, max_side, quality, keep_jpeg), None
        if where[0] == "file":
            return prepare(Path(where[1]), max_side, quality, keep_jpeg), None
        try:
            data = read_at(where)
        except OSError as e:
            raise BadImage(f"cannot read from {shown(where[1])}: {e.strerror or e}") from None
        return prepare_bytes(relpath, data, max_side, quality, keep_jpeg), None
    except BadImage as e:
        return None, (str(e), e.non_image)


def _prepare_chunk(jobs: list) -> list:
    return [prepare_image(job) for job in jobs]


class _Picked:
    """A shard's files, (position, relpath, label, at) each, made from the scan when iterated: a task
    holds its positions (an array), not a tuple per sample for the whole split."""

    def __init__(self, files: list, positions: np.ndarray):
        self.files, self.positions = files, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        for p in self.positions.tolist():
            f = self.files[p]
            yield p, f.relpath, f.label, f.at


def write_shard(task: dict, prepared) -> dict:
    """Write one shard from its files' prepared images (an iterator in file order), then its record."""
    wds_dir = Path(task["wds_dir"])
    name = task["name"]
    samples, rejected, non_images = [], [], []
    writer = None
    try:
        for position, relpath, label, _ in task["files"]:
            image, error = next(prepared)
            if error is not None:
                reason, non_image = error
                (non_images if non_image else rejected).append({"path": relpath, "reason": reason})
                continue
            if writer is None:
                writer = wds.ShardWriter(wds_dir / f"{name}.tar")
            key = f"{position:09d}"
            writer.add(key, image.jpeg, label)
            samples.append([key, label, image.height, image.width, relpath, image.stored, image.why,
                            image.source_sha256])
        files = {}
        if writer is not None:
            writer.close()
            for path in (writer.tar_path, writer.idx_path):
                files[layout.wds_file(path.name)] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    record = {"shard": name, "samples": samples, "rejected": rejected, "non_images": non_images, "files": files}
    write_atomic(wds_dir / f"{name}.json", json.dumps(record, separators=(",", ":")))
    return record


# ------------------------------------------------------------------------------------------ driver


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True)


CHUNK = 8  # images per task handed to a worker


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the converting process ends, however it ends, so no worker
    can outlive it holding its pipes (a Ctrl-C that lands while workers start once left one behind)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent ended before the request took effect
            os._exit(1)


def _worker_loop(conn, parent: int) -> None:
    """A conversion worker: (chunk id, jobs) in, (chunk id, prepared images) out, until None."""
    _die_with_parent(parent)
    _init_worker()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked at the fork; ignored now
    while (message := conn.recv()) is not None:
        chunk_id, jobs = message
        conn.send((chunk_id, _prepare_chunk(jobs)))


class _Pool:
    """Worker processes, each with its own pipe, and no thread in this process.

    concurrent.futures' and multiprocessing's pools share one result pipe among all workers and read
    it from a helper thread: a worker killed while sending (the OOM killer, kill -9) leaves that thread
    blocked on half a message and the run waiting forever, at exit too (seen in test_faults). Here each
    worker's pipe has one writer, so its death reads as EOF and its sentinel fires: the run stops and
    names the files it was working on."""

    def __init__(self):
        self.procs, self.conns = [], []

    def start(self, workers: int) -> None:
        ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C during fork is kept
        try:
            for _ in range(workers):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker_loop, args=(theirs, os.getpid()), daemon=True)
                proc.start()
                theirs.close()  # only the worker holds its end now: its death is EOF here
                self.procs.append(proc)
                self.conns.append(mine)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _died(jobs: list) -> FastRSBError:
    names = ", ".join(shown(job[1]) for job in jobs)
    return FastRSBError(
        f"a conversion worker process died (killed, out of memory, or a decoder crash) while reading one of: "
        f"{names} (in {shown(where_name(jobs[0][0]))}); run the same fastrsb convert again to resume; if it dies "
        "again on these files, move them out of SRC")


def _prepared_stream(jobs, workers: int):
    """Prepared images in job order, computed over `workers` processes, a bounded window ahead."""
    from multiprocessing.connection import wait

    if workers <= 1:
        _init_worker_in_parent()
        yield from map(prepare_image, jobs)
        return
    chunks = iter(lambda: list(itertools.islice(jobs, CHUNK)), [])
    pool = _Pool()
    sent: dict[int, tuple[int, list]] = {}  # chunk id -> (worker, jobs), in flight
    done: dict[int, list] = {}
    next_id = next_out = 0
    exhausted = False
    try:
        pool.start(workers)  # inside the try: a Ctrl-C held back during the forks lands here, workers closed
        while True:
            busy = Counter(w for w, _ in sent.values())
            for w in range(workers):  # two chunks in flight per worker, a bounded window ahead
                while busy[w] < 2 and not exhausted and next_id < next_out + 4 * workers:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                        break
                    pool.conns[w].send((next_id, chunk))
                    sent[next_id] = (w, chunk)
                    busy[w] += 1
                    next_id += 1
            if next_out in done:
                yield from done.pop(next_out)
                next_out += 1
                continue
            if not sent:
                return
            waiting = sorted({w for w, _ in sent.values()})
            ready = wait([pool.conns[w] for w in waiting] + [pool.procs[w].sentinel for w in waiting])
            for w in waiting:
                in_flight = next(jobs for v, jobs in sent.values() if v == w)
                if pool.conns[w] in ready:
                    try:
                        chunk_id, results = pool.conns[w].recv()
                    except (EOFError, OSError):
                        raise _died(in_flight) from None
                    del sent[chunk_id]
                    done[chunk_id] = results
                elif pool.procs[w].sentinel in ready:
                    raise _died(in_flight)
    finally:
        pool.close()


def _init_worker_in_parent() -> None:
    import cv2

    cv2.setNumThreads(1)


def _run_shards(tasks: list[dict], workers: int, desc: str, progress: bool) -> None:
    """Decode and encode images over `workers` processes; this process writes the shards in order.

    Work is spread per image chunk, not per shard, so a dataset smaller than workers x shard_size
    still uses every core; writing a tar is a copy, cheap beside decoding.
    """
    if not tasks:
        return
    jobs = ((at or t["split_dir"], relpath, label, t["max_side"], t["quality"], t["keep_jpeg"])
            for t in tasks for _, relpath, label, at in t["files"])
    bar = _progress_bar(sum(len(t["files"]) for t in tasks), desc, progress)
    stream = _prepared_stream(jobs, workers)
    try:
        def counted():
            for r in stream:
                bar.update(1)
                yield r

        counting = counted()
        for task in tasks:
            write_shard(task, counting)
    finally:
        stream.close()
        bar.close()


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fastrsb-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FastRSBError(f"{out}: cannot write there ({e.strerror}); choose an OUT folder you can write to") from None


def _read_state(path: Path, split_out: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastRSBError(f"{path}: unreadable ({e}); delete {split_out} and convert again") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise FastRSBError(f"{split_out} was written by an older fastrsb (layout format "
                           f"{state.get('format_version', 1)}); re-run fastrsb convert SRC into a new OUT folder "
                           f"(or delete {split_out} first)")
    return state


def _complete(split_out: Path, manifest: dict) -> bool:
    return all((split_out / rel).exists() for rel in manifest["files"])


def _fingerprint(options: dict, classes: list[str], files: list) -> str:
    """sha256 of json.dumps({"options", "classes", "files": [[relpath, label], ...]}), hashed a block of
    files at a time (the same bytes, without the whole split's JSON in memory)."""
    h = hashlib.sha256(json.dumps({"options": options, "classes": classes})[:-1].encode() + b', "files": [')
    for start in range(0, len(files), 65536):
        block = json.dumps([(f.relpath, f.label) for f in files[start:start + 65536]])[1:-1]
        h.update(((", " if start else "") + block).encode())
    h.update(b"]}")
    return h.hexdigest()


def convert_split(scan: SplitScan, out: Path, classes: list[str], formats: list[str], options: dict,
                  workers: int, progress: bool, log=print, splits: tuple[str, ...] = ()) -> dict:
    """Convert one scanned split into OUT/<split>; `splits`: every split of this run (verify checks them all)."""
    split, split_dir, files = scan.name, scan.folder, scan.files
    order = np.arange(len(files))
    if split == "train" and options["shuffle_seed"] >= 0:
        order = np.random.default_rng(options["shuffle_seed"]).permutation(len(files))
    split_out = layout.split_dir(out, split)
    wds_dir = layout.wds_dir(out, split)
    fingerprint = _fingerprint(options, classes, files)
    state_path = layout.state_path(out, split)
    manifest_path = layout.manifest_path(out, split)
    state = _read_state(state_path, split_out)
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise FastRSBError(
                f"{split_out} holds a conversion made from other source files or with other options "
                f"({state.get('options')}); delete {split_out} or convert into another OUT folder"
            )
        formats = sorted(set(formats) | set(state["formats"]))  # a format made before is kept, never removed
        if manifest_path.exists():
            try:
                manifest = layout.read_manifest(out, split)
            except FastRSBError:
                manifest = None  # rewritten below
            if manifest is not None and _complete(split_out, manifest) and set(formats) <= set(manifest["formats"]):
                if "dali" not in manifest["formats"]:
                    shutil.rmtree(wds_dir, ignore_errors=True)  # staging shards a kill left behind
                log(f"{split}: already converted ({manifest_path}); nothing to do")
                return manifest
    else:
        if split_out.exists() and any(p.is_file() and p.suffix != ".tmp" for p in split_out.rglob("*")):
            raise FastRSBError(f"{split_out} holds files of an unknown conversion; delete it or use another OUT")
        split_out.mkdir(parents=True, exist_ok=True)
        state = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "options": options, "formats": []}
        write_atomic(state_path, json.dumps(state, indent=1))
    formats = sorted(formats)
    wds_dir.mkdir(parents=True, exist_ok=True)

    shard_size = options["shard_size"]
    num_shards = max(1, math.ceil(len(files) / shard_size))
    max_side = options["max_side"] if split == "train" else None  # val keeps its size (RECIPES.md eval)
    tasks, resumed = [], 0
    for k in range(num_shards):
        name = shard_name(split, k)
        record_path = wds_dir / f"{name}.json"
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if all((split_out / rel).exists() for rel in record["files"]):
                resumed += 1
                continue
        for stale in wds_dir.glob(f"{name}.*"):
            stale.unlink()
        picked = order[k * shard_size : (k + 1) * shard_size]
        tasks.append(
            {
                "name": name,
                "split_dir": str(split_dir),
                "wds_dir": str(wds_dir),
                "max_side": max_side,
                "quality": options["quality"],
                "keep_jpeg": options["keep_jpeg"],
                "files": _Picked(files, picked),
            }
        )
    for tmp in wds_dir.glob("*.tmp"):
        tmp.unlink()
    if resumed:
        log(f"{split}: resuming, {resumed} of {num_shards} shards already written")
    _run_shards(tasks, workers, f"{split} shards", progress)

    def records():
        """The shards' records in order, one in memory at a time."""
        for k in range(num_shards):
            yield json.loads((wds_dir / f"{shard_name(split, k)}.json").read_text())

    # one pass over the records for the summary and the beton's arrays (no object per sample kept)
    rejected, non_images, shard_files, shards = [], [], {}, []
    counts = np.zeros(len(classes), np.int64)
    kept, reencoded_why = 0, Counter()
    beton_arrays = {name: [] for name in ("shard", "offset", "size", "label", "height", "width", "key")}
    tars = []
    for record in records():
        rows = record["samples"]
        rejected += record["rejected"]
        non_images += record["non_images"]
        shard_files.update(record["files"])
        if record["files"]:
            shards.append({"file": layout.wds_file(f"{record['shard']}.tar"), "num_samples": len(rows)})
        if not rows:
            continue
        labels = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        counts += np.bincount(labels, minlength=len(classes))
        for row in rows:
            if row[5] == layout.KEPT:
                kept += 1
            else:
                reencoded_why[_why_kind(row[6])] += 1
        if "beton" in formats:
            tar = wds_dir / f"{record['shard']}.tar"
            offsets, sizes = wds.read_offsets(tar.with_suffix(".idx"), "jpg")
            keys = np.fromiter((int(r[0]) for r in rows), np.int64, len(rows))
            if len(offsets) != len(rows):
                raise FastRSBError(f"{tar.with_suffix('.idx')}: lists {len(offsets)} samples, its record "
                                   f"{tar.with_suffix('.json')} {len(rows)}; delete both and {tar}, then run the "
                                   "same fastrsb convert again")
            beton_arrays["shard"].append(np.full(len(rows), len(tars), np.int32))
            tars.append(str(tar))
            beton_arrays["offset"].append(offsets)
            beton_arrays["size"].append(sizes)
            beton_arrays["label"].append(labels)
            beton_arrays["height"].append(np.fromiter((r[2] for r in rows), np.int32, len(rows)))
            beton_arrays["width"].append(np.fromiter((r[3] for r in rows), np.int32, len(rows)))
            beton_arrays["key"].append(keys)
    num_samples = int(counts.sum())
    if not num_samples:
        _list(split, "rejected", rejected, log)
        _list(split, "non_images", non_images, log)
        raise FastRSBError(f"{scan.origin or split_dir}: no decodable image among {len(files)} files (listed above: "
                           f"{len(rejected)} rejected, {len(non_images)} non-image files)")

    out_files = {}
    if "beton" in formats:
        from .loaders.beton import ShardSamples, write_beton

        beton = layout.beton_path(out, split)
        if not beton.exists():
            Path(str(beton) + ".tmp").unlink(missing_ok=True)
            log(f"{split}: writing {beton} ({options['write_mode']} mode, {num_samples} samples)")
            write_beton(
                beton,
                ShardSamples(tars, *(np.concatenate(beton_arrays[name]) for name in
                                     ("shard", "offset", "size", "label", "height", "width", "key"))),
                write_mode=options["write_mode"],
                max_side=options["max_side"],
                quality=options["quality"],
                compress_probability=options["compress_probability"],
            )
            state = {**state, "formats": sorted(set(state["formats"]) | {"beton"})}
            write_atomic(state_path, json.dumps(state, indent=1))
        out_files[beton.name] = {"sha256": file_sha256(beton), "bytes": beton.stat().st_size}
    del beton_arrays
    if "dali" in formats:
        out_files.update(shard_files)

    def table_rows():
        i = 0
        for record in records():
            tar = layout.wds_file(f"{record['shard']}.tar") if "dali" in formats else ""
            for key, label, h, w, rel, stored, why, sha in record["samples"]:
                yield i, key, label, h, w, tar, rel, stored, why, sha
                i += 1

    table = layout.samples_path(out, split)
    layout.write_samples(table, table_rows())
    out_files[table.name] = {"sha256": file_sha256(table), "bytes": table.stat().st_size}
    classes_file = layout.classes_path(out)
    out_files["../classes.json"] = {"sha256": file_sha256(classes_file), "bytes": classes_file.stat().st_size}

    manifest = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "splits": sorted(set(splits) | {split}),
        "source": scan.origin or str(split_dir.resolve()),
        "source_layout": scan.layout,
        "formats": formats,
        "num_samples": num_samples,
        "num_files_scanned": len(files),
        "num_classes": len(classes),
        "counts_per_class": dict(zip(classes, counts.tolist())),
        "num_kept": kept,
        "num_reencoded": num_samples - kept,
        "reencoded_why": dict(sorted(reencoded_why.items())),
        "per_file": "samples.jsonl: per sample, stored (kept or re-encoded), why, source_sha256",
        "num_rejected": len(rejected),
        "rejected": rejected,
        "num_non_images": len(non_images),
        "non_images": non_images,
        "num_skipped": len(scan.skipped),
        "skipped": scan.skipped,
        "shards": shards if "dali" in formats else [],
        "options": options,
        "versions": versions("beton" in formats),
        "files": dict(sorted(out_files.items())),
    }
    write_atomic(manifest_path, layout.manifest_text(manifest))
    write_atomic(state_path, json.dumps({**state, "formats": formats}, indent=1))
    if "dali" not in formats:
        shutil.rmtree(wds_dir)  # the shards only staged the beton
    _report(split, manifest, log)
    return manifest


def _why_kind(why: str) -> str:
    """The reason without its per-file sizes, for the manifest's summary."""
    return why[why.index("larger than"):] if "larger than" in why else why


def _list(split: str, kind: str, items: list, log) -> None:
    for item in items[:20]:
        log(f"  {kind.replace('_', '-')}: {shown(item['path'])}: {item['reason']}")
    if len(items) > 20:
        log(f"  ... {len(items) - 20} more {kind.replace('_', '-')} files listed in {split}/manifest.json")


def _report(split: str, manifest: dict, log) -> None:
    log(
        f"{split}: {manifest['num_samples']} images written ({manifest['num_kept']} with their original bytes, "
        f"{manifest['num_reencoded']} re-encoded), {manifest['num_rejected']} rejected, "
        f"{manifest['num_non_images']} non-image files (of {manifest['num_files_scanned']} files), "
        f"{manifest['num_skipped']} entries skipped"
    )
    for kind in ("rejected", "non_images", "skipped"):
        _list(split, kind, manifest[kind], log)


def _disk_error(e: OSError, out: Path, scans: list[SplitScan]) -> FastRSBError:
    where = shown(e.filename) if e.filename else str(out)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = sum(os.path.getsize(p) for s in scans for p in s.inputs) + sum(
        (s.folder / f.relpath).stat().st_size for s in scans if not s.inputs for f in s.files
        if (s.folder / f.relpath).is_file())
        return FastRSBError(
            f"{out}: no space left on the device (writing {where}); free space (the source holds "
            f"{need / 1e6:,.0f} MB, OUT needs about that per format) or choose another OUT, then run the same "
            "fastrsb convert again: finished shards are kept and it resumes")
    return FastRSBError(f"{out}: {e.strerror or e} (writing {where}); fix it and run the same fastrsb convert "
                        "again: finished shards are kept and it resumes")


class _Interrupts:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also remembered: one that lands where Python
    swallows exceptions (a __del__, an at-fork hook) still stops the conversion at the next split."""

    def __init__(self):
        self.hit = False
        self._previous = None

    def _handler(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    formats=("beton", "dali"),
    split: str | None = None,
    max_side: int = 500,
    quality: int = 90,
    write_mode: str = "jpg",
    compress_probability: float = 0.5,
    shard_size: int = 1000,
    workers: int | None = None,
    shuffle_seed: int = 0,
    keep_jpeg: bool = True,
    progress: bool = True,
    log=print,
    layout_name: str = "auto",
) -> dict[str, dict]:
    """Convert SRC into OUT; returns the manifests. SRC: train/ and val/ class folders (or one split with
    `split=`), or ImageNet as downloaded (`loaders/imagenet.py`); `layout_name` picks one where SRC holds several.

    keep_jpeg: store a JPEG's original bytes where every backend decodes them as they are (default);
    False re-encodes every image (the layout of fastrsb < 0.2). `max_side` bounds train images only.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise FastRSBError(f"unknown format {', '.join(unknown) or '(none)'}; choose from: {', '.join(FORMATS)}")
    if "beton" in formats:
        try:
            import ffcv  # noqa: F401
        except ImportError:
            raise missing_extra("ffcv", "ffcv") from None
    if write_mode not in ("jpg", "raw", "proportion"):
        raise FastRSBError(f"--write-mode {write_mode!r}: choose jpg, raw or proportion")
    if not 1 <= quality <= 100:
        raise FastRSBError(f"--quality {quality}: give a JPEG quality from 1 to 100")
    if max_side is not None and max_side < 8:
        raise FastRSBError(f"--max-side {max_side}: give at least 8 px (FFCV's ImageNet files use 500)")
    if shard_size < 1:
        raise FastRSBError(f"--shard-size {shard_size}: give a positive number of samples")
    if not 0.0 <= compress_probability <= 1.0:
        raise FastRSBError(f"--compress-probability {compress_probability}: give a value in [0, 1]")
    workers = workers or os.cpu_count() or 1
    src, out = Path(src), Path(out)
    source = find_source(src, split, layout_name)
    if source.name != "imagefolder" and os.path.realpath(out) == os.path.realpath(src):
        raise FastRSBError(f"OUT {out} is the folder holding the {source.name} files: the train/ and val/ written "
                           "there would read as an ImageFolder next time; choose an OUT folder of its own")
    _check_no_overlap(out, source.folders())
    classes = _check_classes(out, source.splits, {name: source.classes(name) for name in source.splits})
    log(f"{src}: reading {source.describe()}")
    scans = [source.scan(name, classes) for name in source.splits]
    _check_writable(out)  # everything is checked: from here on, OUT is written
    lock = OutputLock(out, "convert").acquire()  # one writer per OUT (fastrsb/lock.py)
    options = {
        "max_side": max_side,
        "quality": quality,
        "write_mode": write_mode,
        "compress_probability": compress_probability,
        "shard_size": shard_size,
        "shuffle_seed": shuffle_seed,
        "keep_jpeg": bool(keep_jpeg),
    }
    manifests = {}
    start = time.perf_counter()
    interrupts = _Interrupts()
    try:
        with interrupts:
            if not layout.classes_path(out).exists():
                write_atomic(layout.classes_path(out), json.dumps(classes, indent=0) + "\n")
            for scan in scans:
                manifests[scan.name] = convert_split(scan, out, classes, formats, options, workers, progress, log,
                                                     splits=tuple(s.name for s in scans))
                interrupts.check()
    except OSError as e:
        raise _disk_error(e, out, scans) from None
    except KeyboardInterrupt:
        print(f"fastrsb convert: interrupted: {out} keeps every finished shard; run the same fastrsb convert again "
              "to resume", file=sys.stderr, flush=True)
        raise
    finally:
        lock.release()
    log(f"converted {', '.join(manifests)} into {out} in {time.perf_counter() - start:.1f} s")
    return manifests
