"""`fastrsb verify OUT`: re-read a converted dataset through FFCV and DALI (CPU) and check it.

Per split: every file the manifest lists exists and has its sha256; each shard's index parses and
fits its tar; the beton, read in order by FFCV's Loader, and the shards, read in order by DALI's
`fn.readers.webdataset`, hold the sample count, the label sequence of samples.tsv and the counts per
class of the manifest; unless `decode=False`, every image is decoded by both. A damaged file is named
with the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .convert import file_sha256
from .errors import FastRSBError, missing_extra
from .loaders import wds


class Damaged(Exception):
    pass


def read_samples_tsv(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            values = line.rstrip("\n").split("\t")
            rows.append(dict(zip(header, values)))
    return rows


def _fix(path: Path) -> str:
    extra = " and its .json record" if path.suffix in (".tar", ".idx") else ""
    return f"delete {path}{extra}, then run the same `fastrsb convert` again to rewrite it"


def check_checksums(split_dir: Path, manifest: dict, log) -> None:
    for rel, expected in manifest["files"].items():
        path = (split_dir / rel).resolve() if rel.startswith("..") else split_dir / rel
        if not path.exists():
            raise Damaged(f"{path}: missing; {_fix(path)}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise Damaged(f"{path}: {size} bytes, manifest says {expected['bytes']}; {_fix(path)}")
        if file_sha256(path) != expected["sha256"]:
            raise Damaged(f"{path}: sha256 differs from the manifest (damaged); {_fix(path)}")
    log(f"  checksums: {len(manifest['files'])} files match")


def read_beton_labels(beton: Path, decode: bool, batch_size: int = 256) -> tuple[np.ndarray, int]:
    """Labels in file order, and how many images decoded, through FFCV's Loader on the CPU."""
    try:
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor
    except ImportError:
        raise missing_extra("ffcv", "ffcv") from None
    pipelines = {
        "image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)] if decode else None,
        "label": [IntDecoder(), ToTensor()],
    }
    loader = Loader(str(beton), batch_size=batch_size, num_workers=min(4, os.cpu_count() or 1),
                    order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines)
    labels, decoded = [], 0
    for batch in loader:
        if decode:
            images, batch_labels = batch
            decoded += len(images)
        else:
            (batch_labels,) = batch if isinstance(batch, (tuple, list)) else (batch,)
        labels.append(np.array(batch_labels, copy=True).reshape(-1))  # FFCV reuses its buffers
    return np.concatenate(labels) if labels else np.zeros(0, np.int64), decoded


def read_shard_labels(tars: list[Path], decode: bool, batch_size: int = 64) -> tuple[np.ndarray, int]:
    """Labels in shard order, and how many images decoded, through DALI's webdataset reader (CPU)."""
    try:
        from nvidia.dali import fn, pipeline_def
    except ImportError:
        raise missing_extra("nvidia.dali", "dali") from None

    @pipeline_def(batch_size=batch_size, num_threads=min(4, os.cpu_count() or 1), device_id=None,
                  prefetch_queue_depth=1)
    def pipe():
        jpegs, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "cls"], missing_component_behavior="error", random_shuffle=False,
            pad_last_batch=True, name="reader",
        )
        if decode:
            images = fn.resize(fn.decoders.image(jpegs, device="cpu"), resize_x=32, resize_y=32)
            return images, cls
        return cls

    p = pipe()
    p.build()
    total = p.epoch_size("reader")
    labels, decoded = [], 0
    for _ in range(-(-total // batch_size)):
        outputs = p.run()
        cls = outputs[-1]
        labels += [int(bytes(np.asarray(cls[i])).decode("ascii")) for i in range(len(cls))]
        if decode:
            decoded += len(outputs[0])
    return np.array(labels[:total], dtype=np.int64), min(decoded, total)


def verify_split(split_dir: Path, decode: bool, log) -> None:
    manifest_path = split_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    split = manifest["split"]
    log(f"{split}: {manifest['num_samples']} samples, formats {', '.join(manifest['formats'])}")
    check_checksums(split_dir, manifest, log)
    rows = read_samples_tsv(split_dir / "samples.tsv")
    expected = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    if len(expected) != manifest["num_samples"]:
        raise Damaged(f"{split_dir / 'samples.tsv'}: {len(expected)} rows, manifest says {manifest['num_samples']}")
    counts = np.bincount(expected, minlength=manifest["num_classes"])
    if list(counts) != list(manifest["counts_per_class"].values()):
        raise Damaged(f"{split_dir / 'samples.tsv'}: counts per class differ from the manifest")

    if "beton" in manifest["formats"]:
        beton = split_dir / f"{split}.beton"
        labels, decoded = read_beton_labels(beton, decode)
        _compare(beton, labels, expected, decoded if decode else None)
        log(f"  FFCV: {len(labels)} samples, labels match" + (f", {decoded} images decoded" if decode else ""))
    if "dali" in manifest["formats"]:
        tars = [split_dir / s["file"] for s in manifest["shards"]]
        for tar in tars:
            index = wds.read_index(tar.with_suffix(".idx"))
            end = max(m.offset + m.size for sample in index for m in sample.values())
            if end > tar.stat().st_size:
                raise Damaged(f"{tar}: shorter than its index says; {_fix(tar)}")
        labels, decoded = read_shard_labels(tars, decode)
        _compare(split_dir / "wds", labels, expected, decoded if decode else None)
        log(f"  DALI: {len(labels)} samples in {len(tars)} shards, labels match"
            + (f", {decoded} images decoded" if decode else ""))


def _compare(where: Path, labels: np.ndarray, expected: np.ndarray, decoded: int | None) -> None:
    if len(labels) != len(expected):
        raise Damaged(f"{where}: read {len(labels)} samples, expected {len(expected)}; {_fix(where)}")
    if not np.array_equal(labels, expected):
        first = int(np.flatnonzero(labels != expected)[0])
        raise Damaged(f"{where}: label of sample {first} is {labels[first]}, samples.tsv says {expected[first]}; {_fix(where)}")
    if decoded is not None and decoded != len(expected):
        raise Damaged(f"{where}: decoded {decoded} of {len(expected)} images; {_fix(where)}")


def verify(out: str | os.PathLike, decode: bool = True, log=print) -> bool:
    """True when every split of OUT checks out; prints what it checked and names any damaged file."""
    out = Path(out)
    if not (out / "classes.json").exists():
        raise FastRSBError(f"{out}: no classes.json; this is not a folder `fastrsb convert` wrote")
    splits = sorted(p.parent for p in out.glob("*/manifest.json"))
    if not splits:
        raise FastRSBError(f"{out}: no <split>/manifest.json; the conversion did not finish: run `fastrsb convert` again")
    ok = True
    for split_dir in splits:
        try:
            verify_split(split_dir, decode, log)
        except Damaged as e:
            log(f"DAMAGED: {e}")
            ok = False
    log("verify: OK" if ok else "verify: FAILED")
    return ok
