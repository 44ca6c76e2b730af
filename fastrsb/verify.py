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

import collections
import hashlib
import io
import itertools
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


UNIT = 1000  # samples per unit of the stored-bytes check when there are no shards to follow
_betons: dict = {}  # per process: the open BetonReader of each beton checked


def _units(split_dir: Path, manifest: dict, rows):
    """The table's rows cut into units of consecutive samples: (tar or None, its sample count per the
    manifest or None, index of the first sample, rows), a shard each when the split has DALI shards."""
    rows, start = iter(rows), 0
    if "dali" in manifest["formats"]:
        for shard in manifest["shards"]:
            chunk = list(itertools.islice(rows, shard["num_samples"]))
            yield str(split_dir / shard["file"]), shard["num_samples"], start, chunk
            start += len(chunk)
    while chunk := list(itertools.islice(rows, UNIT)):  # rows past the shards (a damaged table) or no shards
        yield None, None, start, chunk
        start += len(chunk)


def check_unit(job: tuple) -> tuple[int, int] | str:
    """Check one unit (`_units`) of the stored bytes: (kept, decoded), or the damage found, a message."""
    from PIL import Image

    tar, count, start, rows, beton, decode = job
    try:
        shard_data = [None] * len(rows)
        if tar is not None:
            tar = Path(tar)
            index = wds.read_index(tar.with_suffix(".idx"))
            if len(index) != count:
                raise Damaged(f"{tar}: its index lists {len(index)} samples, manifest says {count}; {_fix(tar)}")
            with open(tar, "rb") as f:
                for k, members in enumerate(index[:len(rows)]):
                    try:
                        shard_data[k] = wds.read_member(tar, members["jpg"], f)
                    except FastRSBError as e:  # the tar ends before a member its index lists
                        raise Damaged(str(e)) from None
        reader = None
        if beton is not None:
            from .loaders.beton import BetonReader

            reader = _betons.get(beton)
            if reader is None:
                _betons.clear()
                reader = _betons[beton] = BetonReader(beton)
            beton = Path(beton)
        kept = decoded = 0
        for k, row in enumerate(rows):
            data = shard_data[k]
            image = reader[start + k] if reader is not None and start + k < len(reader) else None
            where = tar if data is not None else beton
            what = f"sample {row['index']} (key {row['key']}, source {layout.shown(row['source'])})"
            if image is not None:
                if image.label != row["label"]:
                    raise Damaged(f"{beton}: label of {what} is {image.label}, samples.jsonl says {row['label']}; "
                                  f"{_fix(beton)}")
                if (image.height, image.width) != (row["height"], row["width"]):
                    raise Damaged(f"{beton}: {what} is {image.width}x{image.height}, samples.jsonl says "
                                  f"{row['width']}x{row['height']}; {_fix(beton)}")
            jpeg = data if data is not None else (image.data if image is not None and image.jpeg else None)
            if data is not None and image is not None and image.jpeg and image.data != data:
                raise Damaged(f"{beton}: {what} holds other bytes than {tar}; {_fix(beton)}")
            if row["stored"] == layout.KEPT and jpeg is not None:
                if hashlib.sha256(jpeg).hexdigest() != row["source_sha256"]:
                    raise Damaged(f"{where}: {what} was kept from the source, but its bytes do not hash to the "
                                  f"source's sha256; {_fix(where)}")
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
        return kept, decoded
    except Damaged as e:
        return str(e)


def _init_checker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool


def check_stored(out: Path, split: str, manifest: dict, rows, decode: bool, log, workers: int | None = None) -> None:
    """Both formats hold the same bytes, kept JPEGs are the source's bytes, and (decode) each decodes by PIL.

    The table is read one row at a time and checked a shard (or `UNIT` samples) at a time over `workers`
    processes (default: every core), a bounded window ahead; the first damage in table order is reported."""
    from concurrent.futures import ProcessPoolExecutor

    split_dir = layout.split_dir(out, split)
    beton = str(layout.beton_path(out, split)) if "beton" in manifest["formats"] else None
    workers = workers or os.cpu_count() or 1
    jobs = ((*unit, beton, decode) for unit in _units(split_dir, manifest, rows))
    kept = decoded = 0

    def take(result):
        nonlocal kept, decoded
        if isinstance(result, str):
            raise Damaged(result)
        kept, decoded = kept + result[0], decoded + result[1]

    if workers == 1 or manifest["num_samples"] <= 4 * UNIT:  # small: processes would cost more than they save
        for job in jobs:
            take(check_unit(job))
        _betons.clear()
    else:
        from concurrent.futures.process import BrokenProcessPool

        pending = collections.deque()

        def take_next():
            job, future = pending.popleft()
            try:
                take(future.result())
            except BrokenProcessPool:  # a decoder that crashes kills its worker
                where = job[0] or job[4]
                raise Damaged(f"{where}: a process checking samples {job[2]}..{job[2] + len(job[3]) - 1} died (a "
                              f"decoder crash on a damaged image?); {_fix(Path(where))}") from None

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_checker) as pool:
            try:
                for job in jobs:
                    pending.append((job, pool.submit(check_unit, job)))
                    if len(pending) >= 2 * workers:
                        take_next()
                while pending:
                    take_next()
            except BaseException:
                for _, future in pending:
                    future.cancel()
                raise
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
    table = layout.samples_path(out, split)
    try:  # integer columns as arrays; the rows are then read one at a time (no dict per sample is kept)
        columns = layout.read_sample_columns(table, ("label", "height", "width"))
    except FastRSBError as e:
        raise Damaged(str(e)) from None
    expected = columns["label"]
    if len(expected) != manifest["num_samples"]:
        raise Damaged(f"{table}: {len(expected)} rows, manifest says {manifest['num_samples']}")
    counts = np.bincount(expected, minlength=manifest["num_classes"])
    if list(counts) != list(manifest["counts_per_class"].values()):
        raise Damaged(f"{table}: counts per class differ from the manifest")
    try:
        check_stored(out, split, manifest, layout.iter_samples(table), decode, log)
    except FastRSBError as e:
        raise Damaged(str(e)) from None

    if "beton" in manifest["formats"]:
        beton = layout.beton_path(out, split)
        labels, decoded = _guarded_read("beton", [beton], decode, None)
        _compare(beton, labels, expected, decoded if decode else None)
        log(f"  FFCV: {len(labels)} samples, labels match" + (f", {decoded} images decoded" if decode else ""))
    if "dali" in manifest["formats"]:
        tars = [split_dir / s["file"] for s in manifest["shards"]]
        sizes = np.stack([columns["height"], columns["width"]], axis=1) if decode else None
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
