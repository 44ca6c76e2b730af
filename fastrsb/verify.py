"""`fastrsb verify OUT`: re-read a converted dataset and check every promise its manifests make.

Per split that any manifest names (so a missing or half-written val fails):

1. the manifest's own checksum (an edited manifest is detected), then every file it lists exists
   with its size and sha256, and no stray shard or temporary file lies beside them (the loaders
   glob `wds/*.tar`, so a stray shard would change what they read);
2. the per-sample table (samples.jsonl): row count and counts per class as the manifest says;
3. the stored bytes, read directly from the shards and the beton: both formats hold the same
   bytes, and a JPEG kept from the source hashes to the source's sha256;
4. unless `decode=False`, every stored image is decoded by PIL and must have the size the table
   records (a damaged sample is named with its source file);
5. the beton through FFCV's Loader and the shards through DALI's `fn.readers.webdataset`, in a
   child process, so a decoder that crashes (DALI segfaults on some damaged JPEGs) is reported with
   the file instead of killing verify: labels in the table's order, and (decode) every image
   decoded, DALI's at the recorded size.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np

from .convert import file_sha256
from .errors import FastRSBError, missing_extra
from .loaders import layout, wds


class Damaged(Exception):
    pass


def _fix(path: Path) -> str:
    extra = " and its .json record" if path.suffix in (".tar", ".idx") else ""
    return f"delete {path}{extra}, then run the same `fastrsb convert` again to rewrite it"


def check_checksums(out: Path, split: str, manifest: dict, log) -> None:
    split_dir = layout.split_dir(out, split)  # the manifest's paths are relative to it
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


def check_strays(out: Path, split: str, manifest: dict) -> None:
    split_dir, wds_dir = layout.split_dir(out, split), layout.wds_dir(out, split)
    listed = set(manifest["files"])
    strays = [p for p in split_dir.rglob("*.tmp")]
    if wds_dir.is_dir():
        if "dali" not in manifest["formats"]:
            strays += sorted(wds_dir.iterdir())
        else:
            strays += [p for p in sorted(wds_dir.iterdir())
                       if p.suffix in (".tar", ".idx") and p.relative_to(split_dir).as_posix() not in listed]
    if strays:
        raise Damaged(f"{strays[0]}: not part of the conversion the manifest describes"
                      f"{f' (and {len(strays) - 1} more)' if len(strays) > 1 else ''}; the loaders would read it: "
                      "delete it (or run the same fastrsb convert again if it should belong)")


def _stored_bytes(out: Path, split: str, manifest: dict, rows: list[dict]):
    """Per sample: (shard bytes or None, beton image or None), in table order."""
    split_dir = layout.split_dir(out, split)  # the manifest's shard paths are relative to it
    shard_iter = iter(())
    if "dali" in manifest["formats"]:
        def from_shards():
            for shard in manifest["shards"]:
                tar = split_dir / shard["file"]
                index = wds.read_index(tar.with_suffix(".idx"))
                if len(index) != shard["num_samples"]:
                    raise Damaged(f"{tar}: its index lists {len(index)} samples, manifest says {shard['num_samples']}; "
                                  f"{_fix(tar)}")
                with open(tar, "rb") as f:
                    for members in index:
                        try:
                            data = wds.read_member(tar, members["jpg"], f)
                        except FastRSBError as e:  # the tar ends before a member its index lists
                            raise Damaged(str(e)) from None
                        yield data
        shard_iter = from_shards()
    beton_iter = iter(())
    if "beton" in manifest["formats"]:
        from .loaders.beton import read_beton

        beton_iter = read_beton(layout.beton_path(out, split))
    for _ in rows:
        yield next(shard_iter, None), next(beton_iter, None)


def check_stored(out: Path, split: str, manifest: dict, rows: list[dict], decode: bool, log) -> None:
    """Both formats hold the same bytes, kept JPEGs are the source's bytes, and (decode) each decodes by PIL."""
    from PIL import Image

    split_dir, beton = layout.split_dir(out, split), layout.beton_path(out, split)
    kept = decoded = 0
    for row, (shard_data, beton_image) in zip(rows, _stored_bytes(out, split, manifest, rows)):
        where = split_dir / row["shard"] if row["shard"] else beton
        what = f"sample {row['index']} (key {row['key']}, source {layout.shown(row['source'])})"
        if beton_image is not None:
            if beton_image.label != row["label"]:
                raise Damaged(f"{beton}: label of {what} is {beton_image.label}, samples.jsonl says {row['label']}; "
                              f"{_fix(beton)}")
            if (beton_image.height, beton_image.width) != (row["height"], row["width"]):
                raise Damaged(f"{beton}: {what} is {beton_image.width}x{beton_image.height}, samples.jsonl says "
                              f"{row['width']}x{row['height']}; {_fix(beton)}")
        jpeg = shard_data if shard_data is not None else (beton_image.data if beton_image and beton_image.jpeg else None)
        if shard_data is not None and beton_image is not None and beton_image.jpeg and beton_image.data != shard_data:
            raise Damaged(f"{beton}: {what} holds other bytes than {where}; {_fix(beton)}")
        if row["stored"] == layout.KEPT and jpeg is not None:
            if hashlib.sha256(jpeg).hexdigest() != row["source_sha256"]:
                raise Damaged(f"{where}: {what} was kept from the source, but its bytes do not hash to the source's "
                              f"sha256; {_fix(where)}")
            kept += 1
        if decode and jpeg is not None:
            try:
                with Image.open(io.BytesIO(jpeg)) as img:
                    img.load()
                    size = img.size
            except Exception as e:  # PIL raises many types on damaged data
                raise Damaged(f"{where}: {what} does not decode ({type(e).__name__}: {e}); {_fix(where)}") from None
            if size != (row["width"], row["height"]):
                raise Damaged(f"{where}: {what} decodes to {size[0]}x{size[1]}, samples.jsonl says "
                              f"{row['width']}x{row['height']}; {_fix(where)}")
            decoded += 1
    log(f"  stored bytes: {kept} kept JPEGs match their source's sha256"
        + (", formats hold the same bytes" if len(manifest["formats"]) == 2 else "")
        + (f", {decoded} images decoded by PIL" if decode else ""))


# ------------------------------------------------------------------- backend reads (child process)

def read_beton_labels(beton: Path, decode: bool, batch_size: int = 256) -> tuple[np.ndarray, int]:
    """Labels in file order, and how many images FFCV's Loader delivered decoded, on the CPU."""
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
            decoded += int(images.shape[0])
        else:
            (batch_labels,) = batch if isinstance(batch, (tuple, list)) else (batch,)
        labels.append(np.array(batch_labels, copy=True).reshape(-1))  # FFCV reuses its buffers
    return np.concatenate(labels) if labels else np.zeros(0, np.int64), decoded


def read_shard_labels(tars: list[Path], decode: bool, sizes: np.ndarray | None = None,
                      batch_size: int = 32) -> tuple[np.ndarray, int]:
    """Labels in shard order, and how many images DALI decoded to their recorded (height, width)."""
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
            pad_last_batch=False, name="reader",
        )
        if decode:
            return fn.decoders.image(jpegs, device="cpu").shape(), cls
        return cls

    p = pipe()
    p.build()
    total = p.epoch_size("reader")
    labels, decoded = [], 0
    for _ in range(-(-total // batch_size)):
        outputs = p.run()
        cls = outputs[-1]
        start = len(labels)
        labels += [int(bytes(np.asarray(cls[i])).decode("ascii")) for i in range(len(cls))]
        if decode:
            for j in range(len(outputs[0])):
                shape = tuple(int(v) for v in np.asarray(outputs[0][j]))
                i = start + j
                if sizes is not None and i < len(sizes) and shape == (int(sizes[i][0]), int(sizes[i][1]), 3):
                    decoded += 1
    return np.array(labels[:total], dtype=np.int64), decoded


def _child(kind: str, paths: list[str], decode: bool, sizes, conn) -> None:
    try:
        if kind == "beton":
            result = read_beton_labels(Path(paths[0]), decode)
        else:
            result = read_shard_labels([Path(p) for p in paths], decode, sizes)
        conn.send(("ok", result[0].tolist(), result[1]))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which names the file
        conn.send(("error", f"{type(e).__name__}: {e}", 0))
    finally:
        conn.close()


def _guarded_read(kind: str, paths: list[Path], decode: bool, sizes, reader=_child) -> tuple[np.ndarray, int]:
    """Run a backend read (`reader`, in a spawned child); a crash becomes Damaged naming the file (a
    shard: each is then read alone, and the one that crashes is named)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=reader, args=(kind, [str(p) for p in paths], decode, sizes, child), daemon=True)
    proc.start()
    child.close()
    try:
        message = parent.recv()
    except EOFError:
        message = None
    proc.join()
    if message is None or proc.exitcode != 0:
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
        if kind == "dali" and len(paths) > 1:
            offset = 0
            for tar in paths:  # one shard at a time: the one that crashes the decoder raises Damaged
                n = len(wds.read_index(tar.with_suffix(".idx")))
                _guarded_read(kind, [tar], decode, None if sizes is None else sizes[offset:offset + n], reader)
                offset += n
        raise Damaged(f"{paths[0]}: the {'FFCV' if kind == 'beton' else 'DALI'} decoder crashed ({how}) reading it; "
                      f"a stored image is damaged: {_fix(paths[0])}")
    status, labels, decoded = message
    if status != "ok":
        raise Damaged(f"{paths[0]}: {'FFCV' if kind == 'beton' else 'DALI'} could not read it ({labels}); "
                      f"{_fix(paths[0])}")
    return np.asarray(labels, np.int64), decoded


def _compare(where: Path, labels: np.ndarray, expected: np.ndarray, decoded: int | None) -> None:
    if len(labels) != len(expected):
        raise Damaged(f"{where}: read {len(labels)} samples, expected {len(expected)}; {_fix(where)}")
    if not np.array_equal(labels, expected):
        first = int(np.flatnonzero(labels != expected)[0])
        raise Damaged(f"{where}: label of sample {first} is {labels[first]}, samples.jsonl says {expected[first]}; "
                      f"{_fix(where)}")
    if decoded is not None and decoded != len(expected):
        raise Damaged(f"{where}: decoded {decoded} of {len(expected)} images at their recorded size; {_fix(where)}")


def verify_split(out: Path, split: str, decode: bool, log) -> None:
    split_dir = layout.split_dir(out, split)
    try:
        manifest = layout.read_manifest(out, split)
    except FastRSBError as e:
        raise Damaged(str(e)) from None
    log(f"{split}: {manifest['num_samples']} samples, formats {', '.join(manifest['formats'])}")
    check_checksums(out, split, manifest, log)
    check_strays(out, split, manifest)
    try:
        rows = layout.read_samples(layout.samples_path(out, split))
    except FastRSBError as e:
        raise Damaged(str(e)) from None
    expected = np.array([r["label"] for r in rows], dtype=np.int64)
    table = layout.samples_path(out, split)
    if len(expected) != manifest["num_samples"]:
        raise Damaged(f"{table}: {len(expected)} rows, manifest says {manifest['num_samples']}")
    counts = np.bincount(expected, minlength=manifest["num_classes"])
    if list(counts) != list(manifest["counts_per_class"].values()):
        raise Damaged(f"{table}: counts per class differ from the manifest")
    check_stored(out, split, manifest, rows, decode, log)

    if "beton" in manifest["formats"]:
        beton = layout.beton_path(out, split)
        labels, decoded = _guarded_read("beton", [beton], decode, None)
        _compare(beton, labels, expected, decoded if decode else None)
        log(f"  FFCV: {len(labels)} samples, labels match" + (f", {decoded} images decoded" if decode else ""))
    if "dali" in manifest["formats"]:
        tars = [split_dir / s["file"] for s in manifest["shards"]]
        sizes = np.array([(r["height"], r["width"]) for r in rows], np.int64) if decode else None
        labels, decoded = _guarded_read("dali", tars, decode, sizes)
        _compare(layout.wds_dir(out, split), labels, expected, decoded if decode else None)
        log(f"  DALI: {len(labels)} samples in {len(tars)} shards, labels match"
            + (f", {decoded} images decoded at their recorded size" if decode else ""))


def promised_splits(out: Path) -> list[str]:
    """Every split a manifest names, or a conversion started (a state file) but did not finish."""
    names = set(layout.split_names(out))
    names |= {d.name for d in out.iterdir() if d.is_dir() and layout.state_path(out, d.name).is_file()}
    for split in list(names):
        try:
            names |= set(layout.read_manifest(out, split, check=False).get("splits", []))
        except FastRSBError:
            pass
    return sorted(names)


def verify(out: str | os.PathLike, decode: bool = True, log=print) -> bool:
    """True when every split of OUT checks out; prints what it checked and names any damaged file."""
    out = Path(out)
    layout.read_classes(out)  # a FastRSBError with the fix when OUT is no conversion
    splits = promised_splits(out)
    if not splits:
        raise FastRSBError(f"{out}: no <split>/manifest.json; the conversion did not finish: run `fastrsb convert` again")
    ok = True
    for split in splits:
        try:
            verify_split(out, split, decode, log)
        except Damaged as e:
            log(f"DAMAGED: {e}")
            ok = False
    log("verify: OK" if ok else "verify: FAILED")
    return ok
