"""Does conversion hold up at ImageNet's size? `fastrsb convert` and `verify` over a synthetic ImageNet, against ffcv.

A synthetic source shaped like ImageNet-1k is generated once into `--work` (and reused): 1,281,167
small JPEGs (48-112 px a side, so the figures show the per-sample cost that grows with the set, not
the JPEG decoder) in 1,000 classes with ImageNet's WNID-style names, and 50,000 val images named as
ImageNet's, with their labels in a devkit. It exists twice: as an ImageFolder (train/<wnid>/*.JPEG,
val/<wnid>/ILSVRC2012_val_*.JPEG) and as the official archives (ILSVRC2012_img_train.tar of 1,000
per-class tars, the flat ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz with meta.mat). Each
smaller `--sizes` entry is a prefix of every class (and of val, in proportion), made of hard links.

For every size, each contender runs in a process of its own, measured from outside:

- `fastrsb convert` (beton + DALI shards) from the ImageFolder and from the official tars;
- `fastrsb verify` of the result (checksums, bytes, PIL decode of every image, FFCV and DALI reads);
- the baseline a user runs otherwise: ffcv-imagenet's recipe, ffcv's `DatasetWriter` over
  torchvision's `ImageFolder` (jpg, max side 500, quality 90; train and val), with as many workers.

Reported per run: wall time, img/s per core (images / wall / cores), CPU seconds (the process and
its children), peak memory (PSS of the process tree, sampled every second, and its anonymous part,
without the mapped files that FFCV's and DALI's readers count; the largest RSS of one process; and the measured process's RSS after its imports, the libraries' share), the time of each stage of the conversion, and the time per sample at this size over
the time per sample at the smallest size (1.0 when nothing grows with the set). Both conversions of
a size must give byte-identical files (checked).

    fastrsb bench scale --work /data/scale --out benchmarks/results/scale.jsonl   # full size
    sudo .venv/bin/fastrsb bench scale --work /data/scale --drop-caches ...    # every run from the disk
    fastrsb bench scale --work /tmp/s --sizes 2000,8000 --val 400 --classes 20    # a small try

Disk: 11 GB for the full-size sources (measured on ext4), plus one conversion's output while it exists.

Measured once on a 2-core AMD EPYC with 2 workers and --drop-caches, at baa30a2
(benchmarks/results/scale-cpu-2core-baa30a2-2026-12-07.jsonl), for 1,331,167 images. Convert took 312 s
from the tars and 487 s from the folder, against 400 s for ffcv's writer from the folder. The time per
sample from 100k to full size was 0.99 for both conversions and 1.14 for ffcv's. Peak PSS was 1.78 and
1.58 GiB, against ffcv's 1.93 GiB. Verify took 271 s.
"""
from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from fastrsb.benchlog import emit, record

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def add_arguments(parser) -> None:
    parser.add_argument("--work", required=True, help="folder for the generated sources (kept and reused) and outputs")
    parser.add_argument("--sizes", default=f"100000,{IMAGENET_TRAIN}",
                        help="train set sizes to convert, comma-separated; the largest is generated, the others "
                             "are prefixes of each class (default: 100000 and ImageNet's 1,281,167)")
    parser.add_argument("--val", type=int, default=IMAGENET_VAL, help="val images at the largest size")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="before each run, write the page cache to disk and drop it (Linux, as root), so every "
                             "run reads its input from the disk as a first conversion of a fresh download does")
    parser.add_argument("--runs", default="imagefolder,official,verify,ffcv",
                        help="what to measure per size, comma-separated: imagefolder, official, verify, ffcv "
                             "(empty: generate the sources only)")


# ------------------------------------------------------------------------------------- the source

def wnid(c: int) -> str:
    return f"n{c:08d}"


def class_counts(total: int, classes: int) -> list[int]:
    """ImageNet-like: every class holds total // classes images, the first total % classes one more."""
    return [total // classes + (c < total % classes) for c in range(classes)]


def val_label(n: int, classes: int) -> int:
    """The class of val image n (1-based), spread over the classes in a fixed pseudo-random order."""
    return (n * 7919) % classes


def _jpeg(rng: np.random.Generator) -> bytes:
    import cv2

    h, w = (int(v) for v in rng.integers(48, 113, 2))
    base = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape, dtype=np.int16), 0, 255)
    ok, data = cv2.imencode(".jpg", image.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


def _make_class(job: tuple) -> tuple[int, list[bytes]]:
    """Write one class's train images for every size (the smaller ones hard links); return their per-size
    class tars' bytes, smallest size first."""
    c, counts, folders = job
    cv2_threads()
    rng = np.random.default_rng([7, c])
    names, datas = [], []
    for i in range(counts[-1]):
        names.append(f"{wnid(c)}_{i}.JPEG")
        datas.append(_jpeg(rng))
    full = Path(folders[-1]) / "train" / wnid(c)
    full.mkdir(parents=True, exist_ok=True)
    for name, data in zip(names, datas):
        (full / name).write_bytes(data)
    for n, folder in zip(counts[:-1], folders[:-1]):
        d = Path(folder) / "train" / wnid(c)
        d.mkdir(parents=True, exist_ok=True)
        for name in names[:n]:
            os.link(full / name, d / name)
    return c, [_tar(zip(names[:n], datas[:n])) for n in counts]


def _make_val(job: tuple) -> tuple[int, bytes]:
    n, classes, folders, val_counts = job
    cv2_threads()
    data = _jpeg(np.random.default_rng([11, n]))
    name = f"ILSVRC2012_val_{n:08d}.JPEG"
    full = Path(folders[-1]) / "val" / wnid(val_label(n, classes))
    full.mkdir(parents=True, exist_ok=True)
    (full / name).write_bytes(data)
    for k, folder in enumerate(folders[:-1]):
        if n <= val_counts[k]:
            d = Path(folder) / "val" / wnid(val_label(n, classes))
            d.mkdir(parents=True, exist_ok=True)
            os.link(full / name, d / name)
    return n, data


def cv2_threads() -> None:
    import cv2

    cv2.setNumThreads(1)


def meta_mat(path: Path, wnids: list[str]) -> dict[str, int]:
    """The devkit's meta.mat for `wnids` (sorted): leaf synsets (num_children 0) with ILSVRC2012_IDs in the
    reverse of their order, then a parent synset; returns WNID -> ILSVRC2012_ID."""
    try:
        import scipy.io
    except ImportError:
        from fastrsb.errors import missing_extra

        raise missing_extra("scipy", "imagenet") from None

    ids = {w: len(wnids) - i for i, w in enumerate(wnids)}
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ids[w], w, f"synthetic class {w}", "generated", 0, np.zeros(0), 0, 1300) for w in wnids]
    rows.append((len(wnids) + 1, "n99999999", "parent", "a parent synset", 2, np.array([1, 2]), 1, 0))
    synsets = np.zeros((len(rows),), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i] = row
    scipy.io.savemat(str(path), {"synsets": synsets})
    return ids


def make_sources(work: Path, sizes: list[int], val: int, classes: int, workers: int, log=print) -> dict[int, dict]:
    """{size: {"imagefolder": folder, "official": folder, "train": n, "val": n}}; generated unless complete."""
    import multiprocessing as mp

    sizes = sorted(sizes)
    val_counts = [max(classes, round(val * s / sizes[-1])) if s != sizes[-1] else val for s in sizes]
    out = {s: {"imagefolder": work / f"src-{s}" / "imagefolder", "official": work / f"src-{s}" / "official",
               "train": s, "val": v} for s, v in zip(sizes, val_counts)}
    done = work / f"sources-{classes}-{'-'.join(map(str, sizes))}-{val}.done"
    if done.exists():
        return out
    for s in sizes:
        shutil.rmtree(work / f"src-{s}", ignore_errors=True)
        out[s]["official"].mkdir(parents=True)
    start = time.perf_counter()
    counts = [class_counts(s, classes) for s in sizes]
    folders = [str(out[s]["imagefolder"]) for s in sizes]
    with mp.get_context("fork").Pool(workers) as pool:
        tars = [open(out[s]["official"] / TRAIN_TAR, "wb") for s in sizes]
        outer = [tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) for f in tars]
        jobs = ((c, [cs[c] for cs in counts], folders) for c in range(classes))
        for c, inner in pool.imap(_make_class, jobs, chunksize=1):
            for tar, data in zip(outer, inner):
                _add(tar, f"{wnid(c)}.tar", data)
            if c % 100 == 99:
                log(f"  generated train classes 1..{c + 1} ({time.perf_counter() - start:.0f} s)")
        for tar, f in zip(outer, tars):
            tar.close()
            f.close()
        vals = [tarfile.open(out[s]["official"] / VAL_TAR, "w", format=tarfile.USTAR_FORMAT) for s in sizes]
        jobs = ((n, classes, folders, val_counts) for n in range(1, val + 1))
        for n, data in pool.imap(_make_val, jobs, chunksize=256):
            for k, tar in enumerate(vals):
                if n <= val_counts[k]:
                    _add(tar, f"ILSVRC2012_val_{n:08d}.JPEG", data)
        for tar in vals:
            tar.close()
    for s, v in zip(sizes, val_counts):
        official = out[s]["official"]
        ids = meta_mat(official / "meta.mat", [wnid(c) for c in range(classes)])
        truth = "".join(f"{ids[wnid(val_label(n, classes))]}\n" for n in range(1, v + 1)).encode()
        with tarfile.open(official / DEVKIT, "w:gz") as tar:
            _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
            _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", (official / "meta.mat").read_bytes())
        (official / "meta.mat").unlink()
    log(f"  sources generated in {time.perf_counter() - start:.0f} s")
    done.write_text("")
    return out


# ---------------------------------------------------------------------------- measured child runs

def _child_main(spec: dict) -> dict:
    """Run one contender in this process; its result (times, CPU, this process's peak RSS) as a dict."""
    # imports are start-up, not work (the process's time with them is `process_s`)
    import ffcv.writer  # noqa: F401
    import torchvision.datasets  # noqa: F401

    import fastrsb.convert  # noqa: F401
    import fastrsb.verify  # noqa: F401
    with open("/proc/self/status") as f:  # the libraries' share of the peak: this process after its imports
        start_rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    stages = []
    t0 = time.perf_counter()

    def log(*parts):
        stages.append([round(time.perf_counter() - t0, 3), " ".join(map(str, parts))[:200]])

    def timed(owner, name: str, label: str):
        """Log the start and end of each call of owner.name (a stage of the conversion)."""
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            log(f"{label} ...")
            try:
                return inner(*args, **kwargs)
            finally:
                log(f"{label} done")
        setattr(owner, name, wrapper)

    kind = spec["kind"]
    if kind == "convert":
        import fastrsb.convert as module
        from fastrsb.loaders import beton, layout

        found = module.find_source

        def find_source(*args, **kwargs):
            source = found(*args, **kwargs)
            timed(source, "scan", "scan")
            return source
        module.find_source = find_source
        timed(module, "_fingerprint", "fingerprint")
        timed(module, "_run_shards", "shards")
        timed(beton, "write_beton", "beton")
        timed(layout, "write_samples", "samples.jsonl")
        module.convert(spec["src"], spec["out"], workers=spec["workers"], progress=False, log=log,
                       layout_name=spec["layout"])
    elif kind == "verify":
        from fastrsb.verify import verify

        if not verify(spec["out"], log=log):
            raise SystemExit("verify failed: " + json.dumps(stages[-3:]))
    elif kind == "ffcv":
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
        from torchvision.datasets import ImageFolder

        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            dataset = ImageFolder(str(Path(spec["src"]) / split))
            log(f"{split}: {len(dataset)} files listed")
            fields = {"image": RGBImageField(write_mode="jpg", max_resolution=500, jpeg_quality=90),
                      "label": IntField()}
            DatasetWriter(str(Path(spec["out"]) / f"{split}.beton"), fields,
                          num_workers=spec["workers"]).from_indexed_dataset(dataset, chunksize=100)
            log(f"{split}: written")
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "max_rss_mib": max(me.ru_maxrss, kids.ru_maxrss) / 1024, "rss_after_imports_mib": start_rss,
            "stages": stages}


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        found += frontier
    return found


def _pss_kib(pid: int) -> tuple[int, int]:
    """(PSS, its anonymous part) of a process in KiB: the rest is mapped files, page cache the kernel can
    take back (FFCV's and DALI's readers map the files they read)."""
    pss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Pss_Anon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return pss, anon


def drop_caches() -> None:
    """Write dirty pages out, then drop the page cache (root on Linux); FastRSBError names the fix otherwise."""
    from fastrsb.errors import FastRSBError

    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise FastRSBError(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({e.strerror}); run as root on "
                           "Linux, or leave --drop-caches out (runs then read what the page cache holds)") from None


def measure(spec: dict) -> dict:
    """Run `spec` in a child process; its result plus the peak PSS of its process tree (MiB)."""
    code = "import json, sys; from fastrsb.bench.scale import _child_main; " \
           "print('RESULT ' + json.dumps(_child_main(json.loads(sys.argv[1]))))"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = [0, 0]
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            now = [_pss_kib(p) for p in _tree(proc.pid)]
            peak[0] = max(peak[0], sum(p for p, _ in now))
            peak[1] = max(peak[1], sum(a for _, a in now))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['kind']} run failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["peak_pss_mib"], result["peak_pss_anon_mib"] = peak[0] / 1024, peak[1] / 1024
    result["process_s"] = time.perf_counter() - started  # with the interpreter's start and imports
    return result


def _same_files(a: Path, b: Path) -> bool:
    """Both conversions list the same files with the same sha256 (manifests aside: they name the source)."""
    for split in ("train", "val"):
        fa = json.loads((a / split / "manifest.json").read_text())["files"]
        fb = json.loads((b / split / "manifest.json").read_text())["files"]
        if fa != fb:
            return False
    return True


def run(args) -> None:
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    sizes = sorted(int(s) for s in args.sizes.split(","))
    runs = [r for r in args.runs.split(",") if r]  # none: generate the sources only
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"generating (or reusing) the sources in {work}", file=sys.stderr, flush=True)
    sources = make_sources(work, sizes, args.val, args.classes, workers,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    first: dict[str, float] = {}  # per run kind: seconds per sample at the smallest size
    for size in sizes:
        src = sources[size]
        n = src["train"] + src["val"]
        outs = {}
        for kind in runs:
            layout_name = kind if kind in ("imagefolder", "official") else None
            out = work / f"out-{size}-{kind}"
            if kind == "verify":
                if "imagefolder" not in outs:
                    continue
                spec = {"kind": "verify", "out": str(outs["imagefolder"])}
            elif kind == "ffcv":
                shutil.rmtree(out, ignore_errors=True)
                spec = {"kind": "ffcv", "src": str(src["imagefolder"]), "out": str(out), "workers": workers}
            else:
                shutil.rmtree(out, ignore_errors=True)
                spec = {"kind": "convert", "src": str(src[layout_name]), "out": str(out), "workers": workers,
                        "layout": {"official": "imagenet-tars"}.get(layout_name, layout_name)}
            print(f"size {size}: {kind} ...", file=sys.stderr, flush=True)
            if args.drop_caches:
                drop_caches()
            result = measure(spec)
            per_sample = result["wall_s"] / n
            first.setdefault(kind, per_sample)
            extra = {}
            if layout_name:
                outs[kind] = out
                if kind == "official" and "imagefolder" in outs:
                    extra["same_files_as_imagefolder"] = _same_files(outs["imagefolder"], out)
            name = {"imagefolder": "fastrsb convert ImageFolder -> beton + DALI shards",
                    "official": "fastrsb convert official ImageNet tars -> beton + DALI shards",
                    "verify": "fastrsb verify (checksums, bytes, PIL decode, FFCV and DALI reads)",
                    "ffcv": "ffcv DatasetWriter over torchvision ImageFolder (beton only)"}[kind]
            emit(record("scale", f"{name}, {size} train", n / result["wall_s"] / cores, unit="img/s/core",
                        config={"train": src["train"], "val": src["val"], "classes": args.classes,
                                "workers": workers, "run": kind, "page_cache": "dropped" if args.drop_caches else
                                "as left by the previous run"},
                        device="cpu", images=n, wall_s=round(result["wall_s"], 1),
                        process_s=round(result["process_s"], 1), cpu_s=round(result["cpu_s"], 1),
                        img_per_cpu_s=round(n / result["cpu_s"], 1), peak_pss_mib=round(result["peak_pss_mib"]),
                        peak_pss_anon_mib=round(result["peak_pss_anon_mib"]),
                        max_rss_mib=round(result["max_rss_mib"]),
                        rss_after_imports_mib=round(result["rss_after_imports_mib"]), us_per_sample=round(per_sample * 1e6, 1),
                        growth_vs_smallest=round(per_sample / first[kind], 3), stages=result["stages"], **extra),
                 args.out)
        for out in [*outs.values(), work / f"out-{size}-ffcv"]:  # this size's outputs, verified where asked
            shutil.rmtree(out, ignore_errors=True)
