"""One loader contract over three backends (FFCV, DALI, PIL), so the trainer never branches on one.

    loader = make_loader("auto", "OUT", "train", batch_size=256, res=160, device="cuda", seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch, res=res_for(epoch))     # reshuffle; progressive resizing
        for images, labels in loader:                    # already on `device`
            ...                                          # images: uint8 NCHW channels_last; labels: int64

`data` is the folder `fastrsb convert` wrote (FFCV reads `<split>/<split>.beton`, DALI and PIL read
`<split>/wds/*.tar`), or, for the PIL backend only, a source ImageFolder root (`<split>/<class>/*`).

Train split: random-resized-crop (scale 0.08-1, ratio 3/4-4/3) fused with decoding, at `res`, then a
horizontal flip. Val split: the central int(crop_pct * short side) square resized to res x res, i.e.
resize the short side to res / crop_pct and center-crop res (A3: 224 / 0.95 -> 235.8 -> 224; timm's
eval transform floors the intermediate size to 235, a 0.3 % scale difference). Interpolation:

    backend   train                         val
    pil       bilinear, antialiased (PIL)   bicubic, antialiased (PIL)
    dali      linear, antialiased           cubic, antialiased
    ffcv      OpenCV INTER_AREA             OpenCV INTER_AREA (fixed inside libffcv)

Reads (order, DDP shards, repeated augmentation, pads) come from one `sampling.IndexPlan`, identical
for all backends: with the same seed they yield the same labels batch by batch. Crops: FFCV and PIL
draw the same boxes from (seed, read); DALI draws from its own seeded generator (same seed, same
crops for the same sequence of epochs). Iterating twice without `set_epoch` repeats the epoch (as
torch's DistributedSampler does).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import FastRSBError, missing_extra
from .loaders.layout import beton_path, is_converted, read_classes, wds_shards

BACKENDS = ("ffcv", "dali", "pil")


class Loader:
    """What make_loader returns: `for images, labels in loader`, `len(loader)`, `set_epoch`.

    Attributes: backend ('ffcv' | 'dali' | 'pil'), num_samples (samples in the split), num_classes,
    samples_per_epoch (what this rank yields per epoch), device, res.
    """

    def __init__(self, impl, *, res: int, reason: str = ""):
        self._impl = impl
        self.backend = impl.backend
        self.num_samples = int(impl.num_samples)
        self.num_classes = int(impl.num_classes)
        self.samples_per_epoch = impl.plan.reads_per_epoch
        self.device = impl.device
        self.res = res
        self.epoch = 0
        self.reason = reason

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self._impl.plan.batches_per_epoch

    def set_epoch(self, epoch: int, res: int | None = None) -> None:
        """Select the epoch's order (seed, epoch) and, for the train split, a new resolution."""
        if res is not None:
            _check_res(res)
            self.res = int(res)
        self.epoch = int(epoch)

    def __iter__(self):
        # The backends keep no epoch or resolution of their own: the wrapper hands both over.
        return self._impl.iter_epoch(self.epoch, self.res)

    def __repr__(self):
        return (f"Loader(backend={self.backend!r}, num_samples={self.num_samples}, num_classes={self.num_classes}, "
                f"batches={len(self)}, res={self.res}, device={self.device})")


def _check_res(res):
    if not isinstance(res, int) or isinstance(res, bool) or res <= 0:
        raise FastRSBError(f"resolution must be a positive integer number of pixels, got {res!r}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def backend_usable(backend: str) -> bool:
    """Whether the backend's package is installed and imports."""
    if backend == "pil":
        return True
    module = {"ffcv": "ffcv.loader", "dali": "nvidia.dali"}[backend]
    if not _installed(module.split(".")[0]):
        return False
    try:
        __import__(module)
        return True
    except Exception:  # e.g. ffcv built against a missing libturbojpeg
        return False


def has_data_for(backend: str, data, split) -> bool:
    data = Path(data)
    if backend == "ffcv":
        return beton_path(data, split).is_file()
    if backend == "dali" or is_converted(data):  # PIL reads a converted dataset from its shards
        return bool(wds_shards(data, split))
    return (data / split).is_dir()  # PIL over a source ImageFolder


def candidate_backends(data, split, device) -> tuple[list[str], list[str]]:
    """Backends installed, usable and with data for `split`, in the documented order; and why others aren't.

    The order is a prior from measurements: on a GPU, DALI's mixed decoder (nvJPEG + hardware decoder,
    19-25.6k img/s at 160 on one H100, RECIPES.md) before CPU decoding; on the CPU, FFCV > DALI CPU > PIL
    (the brief's 2-core figures 840 / 770 / 590 img/s; benchmarks/results/cpu-2core-2026-11-26.jsonl has
    FFCV and DALI tied at 160, FFCV ahead at 224). `probe_backends` replaces the prior with a measurement.
    """
    import torch

    cuda = torch.device(device).type == "cuda"
    order = ["dali", "ffcv", "pil"] if cuda else ["ffcv", "dali", "pil"]
    usable, skipped = [], []
    for b in order:
        if not backend_usable(b):
            skipped.append(f"{b}: not installed")
        elif not has_data_for(b, data, split):
            skipped.append(f"{b}: no {('.beton' if b == 'ffcv' else 'webdataset shards')} for {split}")
        else:
            usable.append(b)
    if not usable:
        raise FastRSBError(f"no backend can read {data}/{split}: " + "; ".join(skipped))
    return usable, skipped


def choose_backend(data, split, device) -> tuple[str, str]:
    """The documented rule without measuring: the first candidate. Returns (backend, reason)."""
    usable, skipped = candidate_backends(data, split, device)
    return usable[0], "first by the measured prior order" + ("; skipped " + ", ".join(skipped) if skipped else "")


PROBE_CACHE = ".fastrsb-auto-probe.json"


def probe_backends(data, device, *, res: int, batch_size: int, num_workers: int, seconds: float = 2.0,
                   max_batches: int = 6, cached_only: bool = False) -> tuple[str, str] | None:
    """Time the train pipeline of every candidate backend on this machine; return (fastest, reason).

    Each probe builds the loader (FFCV JIT-compiles, DALI builds its pipeline), skips one batch, then
    times up to `max_batches` batches or `seconds`. The result is kept in DATA/.fastrsb-auto-probe.json
    per (device, workers, candidates), so later loaders (the val split, the next run) reuse it without
    probing again. cached_only=True returns None instead of probing (DDP: ranks must not race).
    """
    import json
    import time

    import torch

    from .benchlog import device_name

    data = Path(data)
    usable, skipped = candidate_backends(data, "train", device)
    key = f"{device_name(str(device))}|{num_workers} workers|{','.join(sorted(usable))}"
    cache_path = data / PROBE_CACHE
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        rates = cache[key]
        best = max(rates, key=rates.get)
        return best, "probed earlier on this machine: " + ", ".join(f"{b} {r:,.0f} img/s" for b, r in rates.items())
    if cached_only:
        return None
    if len(usable) == 1:
        return usable[0], "the only usable backend" + ("; skipped " + ", ".join(skipped) if skipped else "")
    rates = {}
    for backend in usable:
        loader = make_loader(backend, data, "train", batch_size=batch_size, res=res, device=device,
                             num_workers=num_workers, verbose=False)
        it = iter(loader)
        next(it)
        n, start = 0, time.perf_counter()
        for images, _ in it:
            n += images.shape[0]
            if n >= max_batches * batch_size or time.perf_counter() - start > seconds:
                break
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # sync: end of the probe's timed window
        rates[backend] = n / (time.perf_counter() - start)
        del it, loader
    try:
        cache[key] = rates
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # a read-only dataset: probe again next time
    best = max(rates, key=rates.get)
    return best, "probed the train pipeline here: " + ", ".join(f"{b} {r:,.0f} img/s" for b, r in rates.items()) \
        + ("; skipped " + ", ".join(skipped) if skipped else "")


def make_loader(backend: str, data, split: str, *, batch_size: int, res: int, device="cpu", rank: int = 0,
                world_size: int = 1, seed: int = 0, aug_repeats: int = 0, crop_pct: float = 0.875,
                drop_last: bool | None = None, num_workers: int | None = None, shuffle: bool | None = None,
                pad: bool = True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hw_decoder_load: float = 1.0,
                verbose: bool = True, probe: bool = True) -> Loader:
    """Build a loader for `split` ('train' augments; any other split is evaluated) of `data`.

    drop_last / shuffle default to True for 'train' and False otherwise. pad=True extends every rank
    to ceil(N / world_size) samples by wrapping around (each sample read at least once; a few twice),
    pad=False cuts to floor(N / world_size) (up to world_size - 1 samples skipped per epoch).
    aug_repeats=R >= 2: repeated augmentation (each read sample R times, epoch length unchanged).
    num_workers: threads (FFCV, DALI) or processes (PIL); default: the cores this process may use.
    backend='auto': on a converted dataset, the fastest candidate by `probe_backends` (a measurement of a few
        train batches per backend, cached in the dataset folder; under DDP rank 0 measures and broadcasts
        its choice); probe=False uses a cached measurement or else the documented prior order of
        `choose_backend`.
    """
    import torch

    _check_res(res)
    if batch_size < 1:
        raise FastRSBError(f"batch_size must be positive, got {batch_size}")
    if not 0 < crop_pct <= 1:
        raise FastRSBError(f"crop_pct must be in (0, 1], got {crop_pct}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastRSBError(f"device {device} asked for but CUDA is not available: pass device='cpu' "
                           "or run on a machine with a GPU and a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise FastRSBError(f"device must be cpu or cuda, got {device}")
    data = Path(data)
    if not data.exists():
        fmt = {"ffcv": " --format beton", "dali": " --format dali"}.get(backend, "")
        raise FastRSBError(f"{data} does not exist: run fastrsb convert SRC {data}{fmt}")
    train = split == "train"
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    reason = ""
    if backend == "auto":
        choice = None
        if is_converted(data):  # a converted dataset: measure, or reuse a measurement
            ddp = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
            if not ddp or rank == 0:
                choice = probe_backends(data, device, res=res, batch_size=batch_size, num_workers=num_workers,
                                        cached_only=not probe or (world_size > 1 and not ddp))
            if ddp:  # rank 0 measured; every rank takes its choice
                shared = [choice]
                torch.distributed.broadcast_object_list(shared, src=0)
                choice = shared[0]
        backend, reason = choice or choose_backend(data, split, device)
        if verbose:
            print(f"fastrsb: loader backend 'auto' -> '{backend}' ({reason})", file=sys.stderr, flush=True)
    if backend not in BACKENDS:
        raise FastRSBError(f"unknown loader backend {backend!r}: choose one of {', '.join(BACKENDS)} or auto")
    if backend != "pil" and not backend_usable(backend):
        raise missing_extra({"ffcv": "ffcv", "dali": "nvidia-dali"}[backend], backend)

    plan_kwargs = dict(rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, aug_repeats=aug_repeats,
                       drop_last=drop_last, pad=pad)
    common = dict(batch_size=batch_size, res=res, device=device, num_workers=num_workers, plan_kwargs=plan_kwargs)

    if backend == "pil":
        from fastrsb.loaders.imagefolder import CropSpec, PILLoader

        spec = CropSpec(train=train, seed=seed, crop_pct=crop_pct, scale=tuple(scale), ratio=tuple(ratio))
        impl = PILLoader(data, split, spec=spec, **common)
    else:
        fmt = "beton" if backend == "ffcv" else "dali"
        if not is_converted(data):
            raise FastRSBError(f"{data} is not a converted dataset (no classes.json): run "
                               f"fastrsb convert SRC {data} --format {fmt}")
        if not has_data_for(backend, data, split):
            what = f"{split}/{split}.beton" if backend == "ffcv" else f"{split}/wds/{split}-*.tar"
            raise FastRSBError(f"{data} has no {what}: run fastrsb convert SRC {data} --format {fmt}")
        num_classes = len(read_classes(data))
        if backend == "ffcv":
            from fastrsb.loaders.ffcv_loader import FFCVLoader

            impl = FFCVLoader(data, split, train=train, seed=seed, crop_pct=crop_pct, scale=scale, ratio=ratio,
                              num_classes=num_classes, **common)
        else:
            from fastrsb.loaders.dali_loader import DALILoader

            impl = DALILoader(data, split, train=train, seed=seed, crop_pct=crop_pct, scale=scale, ratio=ratio,
                              num_classes=num_classes, hw_decoder_load=hw_decoder_load, **common)
    return Loader(impl, res=res, reason=reason)
