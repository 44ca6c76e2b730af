"""`fastrsb convert`: an ImageFolder dataset to FFCV .beton and DALI webdataset shards.

Layout written: see `fastrsb/loaders/__init__.py`. How it runs:

1. Scan SRC/<split>/<class>/** (recursively, like torchvision's ImageFolder), labels from the sorted
   class-folder names (kept in OUT/classes.json, so splits converted later get the same labels).
2. Shards, in parallel over `workers` processes, one shard per task: every file is decoded by
   `fastrsb.images.load_rgb` (RGB, EXIF orientation, max side bounded) and re-encoded as JPEG the
   way FFCV encodes, or listed as rejected / non-image with its reason. A shard is written under
   temporary names and renamed when complete; its record (`.json`, renamed last) marks it done.
3. The beton, from the shard bytes, through ffcv's DatasetWriter (`loaders/beton.py`), to a
   temporary name renamed when complete.
4. samples.tsv and manifest.json (counts, rejected, options, versions, sha256 of every file).

Killed at any moment and run again with the same options, it redoes only unfinished shards and an
unfinished beton, and ends with the same bytes as an uninterrupted run; the same input and options
give byte-identical output (for the same library versions, which the manifest records).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FastRSBError, missing_extra
from .loaders import wds

FORMATS = ("beton", "dali")
FORMAT_VERSION = 1
STATE_FILE = ".convert-state.json"


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def versions(with_ffcv: bool) -> dict:
    """The libraries that shape the output bytes (not fastrsb.benchlog.versions: no torch, no device)."""
    from importlib import metadata

    from . import __version__

    import cv2  # any of the opencv-python distributions

    out = {"fastrsb": __version__, "python": platform.python_version(), "opencv": cv2.__version__}
    for dist in ("numpy", "pillow") + (("ffcv",) if with_ffcv else ()):
        try:
            out[dist] = metadata.version(dist)  # ffcv's own __version__ attribute is stale
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # relative to the split folder
    label: int  # -1: not inside a class folder


def find_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def scan_split(split_dir: Path, classes: list[str]) -> list[SourceFile]:
    """Every file below split_dir, sorted by (class, path); files outside class folders get label -1."""
    index = {name: i for i, name in enumerate(classes)}
    files: list[SourceFile] = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_file():
            files.append(SourceFile(entry.name, -1))
            continue
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name not in index:
            raise FastRSBError(
                f"{entry.path}: class folder not among the {len(classes)} classes of the train split "
                f"(or OUT/classes.json); give every split the same class folders"
            )
        found = []
        for root, dirs, names in os.walk(entry.path):
            dirs.sort()
            for name in sorted(names):
                found.append(SourceFile(os.path.relpath(os.path.join(root, name), split_dir), index[entry.name]))
        if not found:
            raise FastRSBError(f"{entry.path}: empty class folder; add its images or remove the folder")
        files.extend(found)
    return files


def resolve_splits(src: Path, split: str | None) -> dict[str, Path]:
    if not src.exists():
        raise FastRSBError(f"{src}: no such folder; give the dataset root that holds train/ and val/")
    if not src.is_dir():
        raise FastRSBError(f"{src}: not a folder; give the dataset root that holds train/ and val/")
    if split is not None:
        if not split or "/" in split or split.startswith("."):
            raise FastRSBError(f"--split {split!r}: give a plain name such as train or val")
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


# ----------------------------------------------------------------------------------------- workers

def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}"


def prepare_image(job: tuple) -> tuple:
    """(split_dir, relpath, label, max_side, quality) -> (jpeg, height, width, None) or (None, 0, 0, BadImage)."""
    from .images import BadImage, encode_jpeg, load_rgb

    split_dir, relpath, label, max_side, quality = job
    try:
        if label < 0:
            raise BadImage("not inside a class folder", non_image=True)
        rgb = load_rgb(Path(split_dir) / relpath, max_side)
        return encode_jpeg(rgb, quality), int(rgb.shape[0]), int(rgb.shape[1]), None
    except BadImage as e:
        return None, 0, 0, (str(e), e.non_image)


def write_shard(task: dict, prepared) -> dict:
    """Write one shard from its files' prepared images (an iterator in file order), then its record."""
    wds_dir = Path(task["wds_dir"])
    name = task["name"]
    samples, rejected, non_images = [], [], []
    writer = None
    try:
        for position, relpath, label in task["files"]:
            jpeg, height, width, error = next(prepared)
            if error is not None:
                reason, non_image = error
                (non_images if non_image else rejected).append({"path": relpath, "reason": reason})
                continue
            if writer is None:
                writer = wds.ShardWriter(wds_dir / f"{name}.tar")
            key = f"{position:09d}"
            writer.add(key, jpeg, label)
            samples.append([key, label, height, width, relpath])
        files = {}
        if writer is not None:
            writer.close()
            for path in (writer.tar_path, writer.idx_path):
                files[f"wds/{path.name}"] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
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


def _run_shards(tasks: list[dict], workers: int, desc: str, progress: bool) -> None:
    """Decode and encode images over `workers` processes; this process writes the shards in order.

    Work is spread per image (ordered imap), not per shard, so a dataset smaller than
    workers x shard_size still uses every core; writing a tar is a copy, cheap beside decoding.
    """
    if not tasks:
        return
    jobs = ((t["split_dir"], relpath, label, t["max_side"], t["quality"]) for t in tasks for _, relpath, label in t["files"])
    bar = _progress_bar(sum(len(t["files"]) for t in tasks), desc, progress)
    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
    pool = ctx.Pool(workers, initializer=_init_worker) if workers > 1 else None
    try:
        if pool is None:
            _init_worker()
            results = map(prepare_image, jobs)
        else:
            results = pool.imap(prepare_image, jobs, chunksize=8)

        def counted():
            for r in results:
                bar.update(1)
                yield r

        stream = counted()
        for task in tasks:
            write_shard(task, stream)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fastrsb-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FastRSBError(f"{out}: cannot write there ({e.strerror}); choose an OUT folder you can write to") from None


def _load_or_write_classes(out: Path, splits: dict[str, Path]) -> list[str]:
    source_classes = find_classes(splits.get("train", next(iter(splits.values()))))
    path = out / "classes.json"
    if path.exists():
        classes = json.loads(path.read_text())
        missing = [c for c in source_classes if c not in classes]
        if missing:
            raise FastRSBError(
                f"{path} lists {len(classes)} classes without {missing[:5]}; converting into this OUT would "
                "change labels: use a new OUT folder"
            )
        return classes
    write_atomic(path, json.dumps(source_classes, indent=0) + "\n")
    return source_classes


def convert_split(
    split: str,
    split_dir: Path,
    out: Path,
    classes: list[str],
    formats: list[str],
    options: dict,
    workers: int,
    progress: bool,
    log=print,
) -> dict:
    files = scan_split(split_dir, classes)
    order = np.arange(len(files))
    if split == "train" and options["shuffle_seed"] >= 0:
        order = np.random.default_rng(options["shuffle_seed"]).permutation(len(files))
    split_out = out / split
    wds_dir = split_out / "wds"
    wds_dir.mkdir(parents=True, exist_ok=True)

    fingerprint = hashlib.sha256(
        json.dumps(
            {"options": options, "classes": classes, "files": [(f.relpath, f.label) for f in files]}
        ).encode()
    ).hexdigest()
    state_path = split_out / STATE_FILE
    manifest_path = split_out / "manifest.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise FastRSBError(
                f"{split_out} holds a conversion made from other source files or with other options "
                f"({state.get('options')}); delete {split_out} or convert into another OUT folder"
            )
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            complete = all((split_out / rel).exists() for rel in manifest["files"])
            if complete and set(formats) <= set(manifest["formats"]):
                log(f"{split}: already converted ({manifest_path}); nothing to do")
                return manifest
    else:
        if any(wds_dir.iterdir()) or manifest_path.exists():
            raise FastRSBError(f"{split_out} holds files of an unknown conversion; delete it or use another OUT")
        write_atomic(state_path, json.dumps({"fingerprint": fingerprint, "options": options}, indent=1))

    shard_size = options["shard_size"]
    num_shards = max(1, math.ceil(len(files) / shard_size))
    tasks, records = [], {}
    for k in range(num_shards):
        name = shard_name(split, k)
        record_path = wds_dir / f"{name}.json"
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if all((split_out / rel).exists() for rel in record["files"]):
                records[k] = record
                continue
        for stale in wds_dir.glob(f"{name}.*"):
            stale.unlink()
        picked = order[k * shard_size : (k + 1) * shard_size]
        tasks.append(
            {
                "name": name,
                "split_dir": str(split_dir),
                "wds_dir": str(wds_dir),
                "max_side": options["max_side"],
                "quality": options["quality"],
                "files": [(int(p), files[p].relpath, files[p].label) for p in picked],
            }
        )
    for tmp in wds_dir.glob("*.tmp"):
        tmp.unlink()
    if records:
        log(f"{split}: resuming, {len(records)} of {num_shards} shards already written")
    _run_shards(tasks, workers, f"{split} shards", progress)
    for task in tasks:
        k = int(task["name"].rsplit("-", 1)[1])
        records[k] = json.loads((wds_dir / f"{task['name']}.json").read_text())
    records = [records[k] for k in range(num_shards)]

    samples, rejected, non_images, shard_files = [], [], [], {}
    for record in records:
        tar = f"wds/{record['shard']}.tar"
        for key, label, height, width, relpath in record["samples"]:
            samples.append((key, label, height, width, tar if record["files"] else "", relpath))
        rejected += record["rejected"]
        non_images += record["non_images"]
        shard_files.update(record["files"])
    if not samples:
        raise FastRSBError(f"{split_dir}: no decodable image among {len(files)} files; see the rejected list")

    out_files = {}
    if "beton" in formats:
        from .loaders.beton import ShardSamples, write_beton

        beton = split_out / f"{split}.beton"
        if not beton.exists():
            Path(str(beton) + ".tmp").unlink(missing_ok=True)
            log(f"{split}: writing {beton} ({options['write_mode']} mode, {len(samples)} samples)")
            index = {}
            for record in records:
                if record["files"]:
                    tar = split_out / "wds" / f"{record['shard']}.tar"
                    for members in wds.read_index(tar.with_suffix(".idx")):
                        index[members["jpg"].key] = (str(tar), members["jpg"].offset, members["jpg"].size)
            entries = [(*index[key], label, height, width) for key, label, height, width, _, _ in samples]
            write_beton(
                beton,
                ShardSamples(entries),
                write_mode=options["write_mode"],
                max_side=options["max_side"],
                quality=options["quality"],
                compress_probability=options["compress_probability"],
            )
        out_files[beton.name] = {"sha256": file_sha256(beton), "bytes": beton.stat().st_size}
    if "dali" in formats:
        out_files.update(shard_files)

    lines = ["index\tkey\tlabel\theight\twidth\tshard\tsource"]
    lines += [
        f"{i}\t{key}\t{label}\t{h}\t{w}\t{tar if 'dali' in formats else ''}\t{rel}"
        for i, (key, label, h, w, tar, rel) in enumerate(samples)
    ]
    write_atomic(split_out / "samples.tsv", "\n".join(lines) + "\n")
    out_files["samples.tsv"] = {"sha256": file_sha256(split_out / "samples.tsv"), "bytes": (split_out / "samples.tsv").stat().st_size}
    out_files["../classes.json"] = {"sha256": file_sha256(out / "classes.json"), "bytes": (out / "classes.json").stat().st_size}

    counts = [0] * len(classes)
    for _, label, *_ in samples:
        counts[label] += 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "source": str(split_dir.resolve()),
        "formats": sorted(formats),
        "num_samples": len(samples),
        "num_files_scanned": len(files),
        "num_classes": len(classes),
        "counts_per_class": dict(zip(classes, counts)),
        "num_rejected": len(rejected),
        "rejected": rejected,
        "num_non_images": len(non_images),
        "non_images": non_images,
        "shards": [
            {"file": f"wds/{r['shard']}.tar", "num_samples": len(r["samples"])} for r in records if r["files"]
        ] if "dali" in formats else [],
        "options": options,
        "versions": versions("beton" in formats),
        "files": dict(sorted(out_files.items())),
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    if "dali" not in formats:
        shutil.rmtree(wds_dir)  # the shards only staged the beton
    _report(split, manifest, log)
    return manifest


def _report(split: str, manifest: dict, log) -> None:
    log(
        f"{split}: {manifest['num_samples']} images written, {manifest['num_rejected']} rejected, "
        f"{manifest['num_non_images']} non-image files (of {manifest['num_files_scanned']} files)"
    )
    for kind in ("rejected", "non_images"):
        items = manifest[kind]
        for item in items[:20]:
            log(f"  {kind.replace('_', '-')}: {item['path']}: {item['reason']}")
        if len(items) > 20:
            log(f"  ... {len(items) - 20} more {kind.replace('_', '-')} files listed in {split}/manifest.json")


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
    progress: bool = True,
    log=print,
) -> dict[str, dict]:
    """Convert SRC (train/ and val/ class folders, or one split with `split=`) into OUT; returns the manifests."""
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
    splits = resolve_splits(src, split)
    _check_writable(out)
    classes = _load_or_write_classes(out, splits)
    options = {
        "max_side": max_side,
        "quality": quality,
        "write_mode": write_mode,
        "compress_probability": compress_probability,
        "shard_size": shard_size,
        "shuffle_seed": shuffle_seed,
    }
    manifests = {}
    start = time.perf_counter()
    for name, folder in splits.items():
        manifests[name] = convert_split(name, folder, out, classes, formats, options, workers, progress, log)
    log(f"converted {', '.join(manifests)} into {out} in {time.perf_counter() - start:.1f} s")
    return manifests
