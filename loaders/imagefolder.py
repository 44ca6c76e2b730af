"""The PIL reference backend: torchvision-style PIL decoding in DataLoader worker processes.

Reads either the converted webdataset shards (JPEG bytes at the offsets of DALI's .idx files, the
very bytes the FFCV and DALI backends decode) or a source ImageFolder (`SRC/<split>/<class>/**`,
label = position of the class folder in sorted order, as torchvision's ImageFolder): the files
`fastrsb convert` would read, in its order (`source.scan_split`), those with an image extension.

Train: torchvision's RandomResizedCrop geometry (scale 0.08-1, ratio 3/4-4/3) with the box drawn by
`sampling.random_resized_crop` from (seed, read), resized with PIL's antialiased bilinear or bicubic
filter, chosen per read from the same key when `interpolation="random"` (timm's default for its train
transform) or fixed, then a horizontal flip decided by the same key: the FFCV and DALI backends draw
the very same boxes, flips and filters. Val: timm's eval transform (short side resized to
floor(res / crop_pct) bicubic, centre crop res x res with torchvision's rounding) read as one fractional
source box (`sampling.center_crop_box`) and resized to res with antialiased bicubic in one call.
These are the reference pixels `fastrsb bench parity` compares the other backends with.

Batches are uint8 NHWC in worker processes, pinned, and copied to the GPU on a side CUDA stream one
batch ahead (timm's prefetcher idea); they come out as NCHW channels_last views. The batches in flight
in /dev/shm (workers x prefetch x batch) are bounded by `shm_budget`: half of /dev/shm's free space, at
most 4 GiB, with at most 2 batches per worker (`shared_memory_plan` lowers the prefetch, then the workers).

The workers come from a fork server (`worker_context`), never from a fork of the training process:
that process has threads by then (FFCV's and numba's pools, DALI's, torch's), and a child forked
while one of them holds a lock can wait on it forever (a test run hung so in a DataLoader worker).

PIL decodes and resizes on the CPU, image by image: it is the reference, not the fast path
(`fastrsb bench loader` measures it beside the others).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import weakref
from pathlib import Path

import numpy as np

from fastrsb.errors import FastRSBError
from fastrsb.images import IMAGE_EXTENSIONS

from . import layout, registry, sampling
from .layout import ShardBytes, ShardIndex, is_converted, read_classes
from .source import scan_split


def _has_data(data, split) -> bool:
    if layout.is_converted(data):  # PIL reads a converted dataset from its shards
        return bool(layout.wds_shards(data, split))
    return (Path(data) / split).is_dir()  # or a source ImageFolder


def _open(data, split, **kw):
    return PILLoader(data, split, **kw)


registry.register(registry.Backend(
    name="pil", reads="{split}/wds/{split}-*.tar webdataset shards or {split}/<class>/ folders",
    convert_format="dali", has_data=_has_data, open=_open, prior_cuda=2, prior_cpu=2))




def scan_imagefolder(root: Path, src_root: Path | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) of an ImageFolder split folder: the files `fastrsb convert` reads, in
    its order, with its labels (`source.scan_split`, which both use; `src_root`: the SRC folder that
    symlinks may lead into, default `root`).

    Two differences from the converter, both leaving files out: files directly in the split folder
    (label -1, outside every class) are not read, and only names with an image extension
    (`fastrsb.images.IMAGE_EXTENSIONS`) are. The converter sniffs every file's content and lists what is
    no image with the reason; a loader cannot list, so it skips by name rather than fail mid-epoch on a
    README.txt. A picture under another extension is therefore converted but not read from the source."""
    classes = layout.find_classes(root)
    if not classes:
        raise FastRSBError(f"{root} holds no class folders; put the images in {root}/<class>/<image>")
    scan = scan_split(root.name, root, classes, root if src_root is None else src_root)
    items = [(os.path.join(root, f.relpath), f.label) for f in scan.files
             if f.label >= 0 and f.relpath.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, items


# ------------------------------------------------------------------ worker processes

# imported once by the fork server, so each worker it forks starts with them (torch's DataLoader worker
# loop, the decoders, this module's dataset and timm's transforms for timm's own loaders)
WORKER_PRELOAD = ["torch", "numpy", "PIL.Image", "fastrsb.loaders.imagefolder", "timm.data"]


def worker_context():
    """The multiprocessing context for DataLoader workers: 'forkserver' (spawn where there is none).

    A fork copies the parent's memory but only the forking thread: a lock that another thread held
    (numba's or FFCV's pools, DALI's threads, an allocator) stays held in the child for ever. The fork
    server is a fresh single-threaded process, started at the first use with `WORKER_PRELOAD` imported,
    that forks the workers; Python 3.14 makes it the default on Linux for this reason."""
    methods = mp.get_all_start_methods()
    if "forkserver" not in methods:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)  # read when the server starts; later calls change nothing
    return ctx


def use_worker_context(loader):
    """`loader` (a DataLoader, or a wrapper of one in `.loader`, as timm's PrefetchLoader) starts its
    workers through `worker_context` (timm's create_loader takes no context), and each worker ends
    when the process that made the loader ends (`ExitWithMain`); returns `loader`."""
    inner = getattr(loader, "loader", loader)
    if inner.num_workers > 0:
        inner.multiprocessing_context = worker_context()
        inner.worker_init_fn = ExitWithMain(os.getpid(), inner.worker_init_fn)
    return loader


class ExitWithMain:
    """A DataLoader worker_init_fn that makes the worker exit when the main process is gone.

    torch's workers watch their parent, and a fork server's worker has the server as its parent, not
    the process that reads the batches. Python keeps the server alive while any of its children live,
    so after a kill -9 of the main process (a preemption's SIGKILL, the OOM killer) the workers and the
    server would stay for ever, holding the main process's stdout and stderr open. A daemon thread in
    each worker waits on a pidfd of the main process and ends the worker when it exits. `inner`: the
    loader's own worker_init_fn, called after."""

    def __init__(self, main_pid: int, inner=None):
        self.main_pid = main_pid
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        import threading

        threading.Thread(target=_exit_with, args=(self.main_pid,), daemon=True, name="exit-with-main").start()
        if self.inner is not None:
            self.inner(worker_id)


def _exit_with(pid: int) -> None:
    import select
    import time

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): poll
        fd = None
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has exited
    else:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(0)


# ------------------------------------------------------------------ decoding

def decode_rgb(data):
    """PIL RGB image of JPEG bytes or a file path, made RGB the way the converter does (fastrsb.images)."""
    from PIL import Image, ImageOps

    from fastrsb.images import to_rgb

    img = Image.open(io.BytesIO(data) if not isinstance(data, str) else data)
    return to_rgb(ImageOps.exif_transpose(img))


def crop_resize(img, tagged: int, res: int, spec: sampling.CropSpec) -> np.ndarray:
    """One read: HxWx3 uint8 at res x res (train: seeded RRC + flip; val: timm's eval box), resized with
    PIL's antialiased bilinear or bicubic filter, as `spec.read` (the box every backend reads) says; train
    boxes are cut out before the resize, eval boxes resized within the image (`spec.crop_first`)."""
    from PIL import Image

    width, height = img.size
    top, left, h, w, flip, bicubic = spec.read(height, width, tagged, res)
    resample = Image.BICUBIC if bicubic else Image.BILINEAR
    if spec.crop_first:  # train: whole-pixel box, cut out first (timm's F.resized_crop)
        box = (int(left), int(top), int(left + w), int(top + h))
        out = img.crop(box).resize((res, res), resample)
    else:  # eval: the box within the whole image (timm's resize then centre crop)
        out = img.resize((res, res), resample, box=(left, top, left + w, top + h))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


class PlanDataset:
    """Map-style dataset over tagged reads: item (tagged index, res) -> (HWC uint8, label)."""

    def __init__(self, read, labels: np.ndarray, spec: sampling.CropSpec):
        self.read = read  # sample index -> bytes or path
        self.labels = labels
        self.spec = spec

    def __len__(self):
        return int(self.labels.size)

    def __getitem__(self, item):
        tagged, res = item
        i = int(tagged) & sampling.SAMPLE_MASK
        try:
            img = decode_rgb(self.read(i))
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a file it cannot decode
            raise FastRSBError(f"{self.read.name(i)}: cannot decode ({type(e).__name__}: {e}); run fastrsb convert, "
                               "which lists such files instead of training on them, or remove the file") from None
        return crop_resize(img, tagged, res, self.spec), int(self.labels[i])


class _ReadPath:
    def __init__(self, paths):
        self.paths = paths

    def __call__(self, i):
        return self.paths[i]

    def name(self, i) -> str:
        return self.paths[i]


def collate(batch):
    import torch

    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, labels


SHM_BUDGET_MAX = 4 << 30  # bytes of /dev/shm the PIL loader's batches in flight may hold, at most
PREFETCH_FACTOR = 2  # batches each worker runs ahead, at most


def shm_budget(path: str = "/dev/shm") -> int:
    """The shared memory the PIL loader's batches in flight may take: half of what is free in /dev/shm,
    at most SHM_BUDGET_MAX (4 GiB). Worker processes hand whole collated batches over in /dev/shm; a
    container with a small one (Docker's default is 64 MB) dies with a bus error when they overfill it."""
    try:
        st = os.statvfs(path)
    except OSError:  # no /dev/shm (not Linux): the budget alone
        return SHM_BUDGET_MAX
    return min(SHM_BUDGET_MAX, st.f_bavail * st.f_frsize // 2)


def shared_memory_plan(batch_bytes: int, num_workers: int, budget: int) -> tuple[int, int | None]:
    """(workers, prefetch_factor) whose batches in flight, workers x prefetch x batch_bytes, fit `budget`:
    prefetch PREFETCH_FACTOR (2) when it fits, else 1, then fewer workers. One batch over the budget is
    an error that names the fix. No workers: (0, None), nothing in shared memory."""
    if num_workers <= 0:
        return 0, None
    if batch_bytes > budget:
        raise FastRSBError(
            f"the PIL loader's batches ({batch_bytes / 2**20:.0f} MiB each) do not fit its shared-memory budget "
            f"({budget / 2**20:.0f} MiB, half of what is free in /dev/shm, at most 4 GiB): enlarge /dev/shm "
            "(docker run --shm-size=8g), lower the batch per GPU, use num_workers=0, or use the dali or ffcv loader")
    prefetch = max(1, min(PREFETCH_FACTOR, budget // (num_workers * batch_bytes)))
    return max(1, min(num_workers, budget // (prefetch * batch_bytes))), prefetch


class _PlanBatchSampler:
    """The plan's batches of the owner's current epoch and resolution, as (tag, res) pairs.

    It holds its owner weakly: a strong reference would make a cycle (owner -> DataLoader -> sampler ->
    owner), freed only by the garbage collector, which finalises the worker queues before the
    DataLoader iterator that must use them to stop its workers, so each collected loader stalled for
    5 s per worker. Without the cycle the loader is freed as soon as its last reference goes."""

    def __init__(self, owner):
        self._owner = weakref.ref(owner)

    @property
    def owner(self):
        return self._owner()

    def __iter__(self):
        res = self.owner.res
        for b in self.owner.plan.batches(self.owner.epoch)[self.owner.start:]:
            yield [(int(t), res) for t in b]

    def __len__(self):
        return self.owner.plan.batches_per_epoch - self.owner.start


class PILLoader:
    """Backend 'pil'. Use fastrsb.loaders.make_loader rather than this class directly."""

    backend = "pil"

    def __init__(self, data, split, *, batch_size, res, device, crop: sampling.CropSpec, num_workers: int,
                 plan_kwargs: dict, options: dict):
        import torch

        data = Path(data)
        if is_converted(data):
            self.classes = read_classes(data)
            index = ShardIndex.load(data, split)
            read, labels = ShardBytes(index), index.labels
            self.source = "webdataset shards"
        elif (data / split).is_dir():
            self.classes, items = scan_imagefolder(data / split, src_root=data)
            read, labels = _ReadPath([p for p, _ in items]), np.asarray([l for _, l in items], np.int64)
            self.source = "ImageFolder"
        else:
            raise FastRSBError(f"{data} is neither a converted dataset (no classes.json) nor an ImageFolder "
                               f"root with {split}/: run fastrsb convert SRC OUT, or pass SRC")
        self.num_samples = int(labels.size)
        self.plan = sampling.IndexPlan(self.num_samples, batch_size, **plan_kwargs)
        self.device = torch.device(device)
        self.res = res
        self.epoch = 0
        self.start = 0  # the epoch's first batch (a run resumed mid-epoch skips the ones before)
        self.dataset = PlanDataset(read, labels, crop)
        cuda = self.device.type == "cuda"
        # batches in flight sized at the resolution the loader is made with (set_epoch may change it)
        num_workers, prefetch = shared_memory_plan(batch_size * 3 * res * res, num_workers, shm_budget())
        self.num_workers, self.prefetch_factor = num_workers, prefetch
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_PlanBatchSampler(self), num_workers=num_workers, collate_fn=collate,
            pin_memory=cuda, persistent_workers=num_workers > 0, prefetch_factor=prefetch,
            # a private generator: the DataLoader's first iteration would otherwise draw from torch's global
            # RNG (drop-path masks), so a resumed run would continue a different stream (crops come from the plan)
            generator=torch.Generator().manual_seed(crop.seed))
        use_worker_context(self.loader)

    def iter_epoch(self, epoch: int, res: int, start: int = 0):
        """Batches start, start + 1, ... of `epoch` at `res` (read by the batch sampler in the worker
        processes' tasks)."""
        import torch

        self.epoch, self.res, self.start = int(epoch), int(res), int(start)
        if self.device.type != "cuda":
            for images, labels in self.loader:
                yield images.permute(0, 3, 1, 2), labels
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for images, labels in self.loader:
            with torch.cuda.stream(stream):  # copy batch k+1 while the caller computes on batch k
                nxt = (images.to(self.device, non_blocking=True).permute(0, 3, 1, 2),
                       labels.to(self.device, non_blocking=True))
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in nxt:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = nxt
        if pending is not None:
            yield pending
