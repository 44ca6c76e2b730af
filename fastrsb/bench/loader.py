"""How many images per second does each loader backend deliver, against timm's own A3 loader?

Question: img/s of fastrsb's FFCV / DALI / PIL loaders (train: random-resized-crop + flip; val: resize
+ center crop), at 160 and 224, on this machine, compared with timm's `create_loader` over the source
ImageFolder with the A3 settings (RandAugment rand-m6-mstd0.5-inc1, RRC, flip, its prefetcher),
measured in the same run so the ratio holds on a noisy machine. Ratios compare equal work: a train
line with a ratio is the fastrsb loader followed by the trainer's GPU augmentation on the loader's
device (`with_train_augment`: RandAugment, mixup/cutmix, normalise; compiled on CUDA), while timm's
workers run RandAugment and its prefetcher normalises; the train loader-alone lines carry no ratio, the
val lines (resize + center crop on both sides) do.

Method: one loader per (backend, split), built once (FFCV compiles once); per run, `set_epoch(e, res)`,
skip `--warmup` batches, time the next `--batches` batches (epochs chain if the dataset is small),
with a CUDA synchronisation at the end on a GPU; median of `--runs`. Images are consumed on the
loader's device (a sum per batch), nothing else. Output: one JSON line per measurement, with device,
versions and git revision; `--out FILE` appends them there too.

    fastrsb bench loader --demo --quick                                   # anywhere, no GPU needed
    python benchmarks/loader_throughput.py --data OUT --src SRC --device cuda --workers 16

Goal (issue 9): on one H100 with 16 cores, DALI mixed + the GPU augmentation at 160 delivers >= 20,000
img/s. On the CPU the augmentation (eager there) dominates these lines.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from pathlib import Path

from fastrsb.benchlog import Timer, emit, failure, record
from fastrsb.errors import FastRSBError
from fastrsb.loaders.imagefolder import use_worker_context
from fastrsb.recipes import A3

RAND_AUGMENT = A3.rand_augment  # rand-m6-mstd0.5-inc1, on both sides of the train comparison


def batches_forever(loader, res, first_epoch: int):
    epoch = first_epoch
    while True:
        loader.set_epoch(epoch, res=res)
        yield from loader
        epoch += 1


def measure(loader, *, res, device, warmup: int, batches: int, runs: int, windows: int = 1):
    """Median img/s over timed windows of `batches` batches (the one Timer): per run, a fresh pass from
    its own epoch, `warmup` untimed batches, then `windows` windows back to back, so the later windows
    are at steady state (a prefetching loader's queue, filled while it waited, is drained by then).

    Every image is consumed on the loader's device (a reduction per batch), so lazy work is paid for."""
    rates = []
    for run in range(runs):
        it = batches_forever(loader, res, 1000 * run)
        for _ in range(warmup):
            next(it)
        for _ in range(windows):
            timer = Timer(device).start()
            n = 0
            for _ in range(batches):
                images, labels = next(it)
                images[:, :, 0, 0].sum()
                n += images.shape[0]
            rates.append(n / timer.stop())
        it.close()
    return statistics.median(rates), rates


def train_augment(num_classes: int, device, precision: str = "auto"):
    """The trainer's augmentation for A3 (RandAugment m6, mixup 0.1 / cutmix 1.0, normalise to the dtype of
    the trainer's `precision`), compiled on CUDA as the trainer compiles it. Make it once and share it:
    each compiled copy compiles again."""
    import torch

    from fastrsb.augment import make_train_augment, recipe_augment_kwargs
    from fastrsb.runtime import autocast_dtype, resolve_precision
    from fastrsb.step import compile_augment, default_compile_mode

    dtype = autocast_dtype(resolve_precision(precision, torch.device(device), A3.mixed_precision))
    augment = make_train_augment(num_classes=num_classes, dtype=dtype, **recipe_augment_kwargs(A3))
    return compile_augment(augment, device, default_compile_mode(device))


class with_train_augment:
    """A loader followed by the trainer's augmentation (`train_augment`) on the loader's device: the same
    work as timm's create_loader, whose workers run RandAugment per image and whose prefetcher
    normalises (timm's mixup, on the GPU, is left out of it). Through the trainer's own path
    (`fastrsb.prefetch.AugmentedBatches`: on CUDA, the next batch augmented on a side stream). A compiled
    augmentation compiles during the first warm-up batch."""

    def __init__(self, loader, augment, seed: int = 0):
        import torch

        self.loader = loader
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch, res=None):
        self.loader.set_epoch(epoch, res=res)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        from fastrsb.prefetch import AugmentedBatches

        return AugmentedBatches(iter(self.loader), self.augment, self.generator, self.loader.device,
                                count=len(self.loader))


def rejected_files(data, split: str) -> list[str]:
    """The source files of `split` that `fastrsb convert` rejected (relative paths), from its manifest
    (none when `data` holds no converted split)."""
    from fastrsb.loaders.layout import manifest_path, read_manifest

    if not manifest_path(data, split).exists():
        return []
    return [r["path"] for r in read_manifest(data, split)["rejected"]]


class TimmBaseline:
    """timm.data.create_loader over the source ImageFolder with the A3 train / test transforms.

    `skip`: files (relative to the split folder) to leave out of timm's list, the converter's rejected
    ones (`rejected_files`): timm then reads the images fastrsb reads, rather than open each broken file
    every epoch and log "Skipped sample" for it."""

    def __init__(self, src: Path, split: str, *, res, batch_size, workers, device, skip=()):
        import torch
        from timm.data import create_dataset, create_loader

        self.split, self.device = split, device
        ds = create_dataset("", root=str(src / split), split=split, is_training=split == "train")
        if skip:
            root, skip = Path(src) / split, set(skip)
            ds.reader.samples = [(p, t) for p, t in ds.reader.samples if Path(p).relative_to(root).as_posix() not in skip]
        train = split == "train"
        # train: "random" (bilinear or bicubic per image), timm's default and fastrsb's; eval: bicubic
        self.loader = create_loader(
            ds, input_size=(3, res, res), batch_size=batch_size, is_training=train,
            auto_augment=RAND_AUGMENT if train else None, color_jitter=0.0,
            interpolation="random" if train else "bicubic", crop_pct=0.95, num_workers=workers,
            device=torch.device(device), use_prefetcher=True, pin_memory=device.startswith("cuda"),
            persistent_workers=True)
        use_worker_context(self.loader)  # its workers from the fork server too, as fastrsb's PIL loader's

    def set_epoch(self, epoch, res=None):  # timm's input size is fixed at creation
        pass

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def make_demo(root: Path, per_class: int) -> tuple[Path, Path]:
    from fastrsb.convert import convert
    from fastrsb.demo_data import make_demo_data

    src, out = root / "src", root / "out"
    make_demo_data(src, num_classes=10, train_per_class=per_class, val_per_class=max(per_class // 3, 8),
                   min_size=200, max_size=400)
    convert(src, out, progress=False, log=lambda *a: None)
    return src, out


def add_arguments(p) -> None:
    from fastrsb.runtime import PRECISIONS

    p.add_argument("--data", type=Path, help="folder written by fastrsb convert")
    p.add_argument("--src", type=Path, help="source ImageFolder (for the timm baseline and the PIL backend)")
    p.add_argument("--demo", action="store_true", help="make a demo dataset (10 classes, 200-400 px) in a temp dir")
    p.add_argument("--demo-per-class", type=int, default=60)
    p.add_argument("--backends", default="ffcv,dali,pil")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--sizes", default="160,224", help="comma-separated resolutions")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="default: the cores this process may use")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                   help="the trainer's --precision: the dtype the augmentation normalises to (auto: bf16 on CUDA)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prefetch-depths", default="2",
                   help="comma-separated DALI prefetch depths (batches run ahead) to measure; other backends use the first")
    p.add_argument("--hw-decoder-loads", default="1.0",
                   help="comma-separated shares of JPEGs for DALI's hardware decoder (mixed only) to measure, "
                        "e.g. 1.0,0.65; other backends ignore it")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch 64, 2 warm-up + 6 timed batches, 2 runs")


def _sweep(option: str, text, kind, ok, what: str) -> list:
    """A comma-separated list of values to measure, each checked, or an error naming the option."""
    try:
        values = [kind(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        raise FastRSBError(f"{option} {text!r}: give comma-separated {what}")
    return values


def run(args) -> list[dict]:
    if args.quick:
        args.batch_size, args.warmup, args.batches, args.runs = 64, 2, 6, 2
    workers = args.workers or len(os.sched_getaffinity(0))
    from fastrsb.runtime import prepare_device

    prepare_device(args.device)  # as the trainer sets the device up

    from fastrsb.loaders import make_loader
    from fastrsb.loaders.registry import usable as backend_usable

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise FastRSBError(f"--sizes {args.sizes!r}: give comma-separated resolutions in pixels, e.g. 160,224") from None
    depths = _sweep("--prefetch-depths", args.prefetch_depths, int, lambda d: d >= 1, "positive integers, e.g. 2,4")
    loads = _sweep("--hw-decoder-loads", args.hw_decoder_loads, float, lambda v: 0.0 <= v <= 1.0,
                   "shares in [0, 1], e.g. 1.0,0.65")
    from fastrsb.loaders import registry

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in registry.names()]
    if unknown or any(s < 8 for s in sizes):
        raise FastRSBError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(registry.names())}"
                           if unknown else f"--sizes {args.sizes!r}: give resolutions of at least 8 px")
    from fastrsb.loaders.layout import manifest_path, read_manifest

    tmp = None
    if args.demo:
        tmp = tempfile.TemporaryDirectory(prefix="fastrsb-bench-")
        args.src, args.data = make_demo(Path(tmp.name), args.demo_per_class)
    if args.data is None and args.src is None:
        raise FastRSBError("pass --data OUT (and --src SRC for the baseline) or --demo")
    if args.src is None and args.data is not None and manifest_path(args.data, "train").exists():
        source = Path(read_manifest(args.data, "train")["source"]).parent
        args.src = source if source.is_dir() else None

    config = {"workers": workers, "batch_size": args.batch_size, "warmup_batches": args.warmup,
              "timed_batches": args.batches, "runs": args.runs, "data": str(args.data), "src": str(args.src)}
    out = []

    def emit_line(name, value, baseline=None, **extra):
        rec = record("loader", name, value, config={**config, **extra}, baseline=baseline, device=args.device)
        out.append(emit(rec, args.out))

    augments = {}  # one (compiled) augmentation per class count, shared by the backends
    for split in args.splits.split(","):
        baselines = {}
        if args.src is not None and not args.no_baseline:
            for res in sizes:
                skip = rejected_files(args.data, split) if args.data is not None else ()
                base = TimmBaseline(args.src, split, res=res, batch_size=args.batch_size, workers=workers,
                                    device=args.device, skip=skip)
                med, rates = measure(base, res=res, device=args.device, warmup=args.warmup, batches=args.batches,
                                     runs=args.runs)
                baselines[res] = ("timm create_loader, " + ("rand-m6-mstd0.5-inc1 + RRC + flip" if split == "train"
                                                            else "resize bicubic 0.95 + center crop"), med)
                emit_line(f"timm {split} {res}", med, backend="timm", split=split, res=res,
                          img_per_s_runs=[round(r, 1) for r in rates])
                del base
        for backend in backends:
            if not backend_usable(backend):
                print(f"# {backend}: skipped, not installed or not usable here", flush=True)
                continue
            data = args.data if args.data is not None else args.src
            dali = backend == "dali"
            for depth, load in [(d, v) for d in depths for v in loads] if dali else [(depths[0], loads[0])]:
                tag = (f" depth {depth}" if dali and len(depths) > 1 else "") + \
                      (f" hw {load:g}" if dali and len(loads) > 1 else "")
                try:
                    t0 = time.perf_counter()
                    loader = make_loader(backend, data, split, batch_size=args.batch_size, res=sizes[0], device=args.device,
                                         num_workers=workers, crop_pct=0.95, drop_last=True, verbose=False,
                                         prefetch_depth=depth, hw_decoder_load=load)
                    build_s = time.perf_counter() - t0
                    common = {"backend": backend, "split": split, "build_s": round(build_s, 1)}
                    if dali:
                        common["prefetch_depth"], common["hw_decoder_load"] = depth, load
                    for res in sizes:
                        # the loader alone: for val the same work as timm's val loader (so a ratio), for train
                        # without RandAugment (no ratio) ...
                        med, rates = measure(loader, res=res, device=args.device, warmup=args.warmup,
                                             batches=args.batches, runs=args.runs)
                        emit_line(f"{backend} {split} {res}{tag}", med, res=res, img_per_s_runs=[round(r, 1) for r in rates],
                                  baseline=baselines.get(res) if split == "val" else None, **common)
                        if split != "train":
                            continue
                        # ... and for train, the same work as timm's loader: the trainer's augmentation on the
                        # loader's device (compiled on CUDA: the compile happens in the warm-up batches)
                        if loader.num_classes not in augments:
                            augments[loader.num_classes] = train_augment(loader.num_classes, args.device,
                                                                         args.precision)
                        augment = augments[loader.num_classes]
                        med, rates = measure(with_train_augment(loader, augment), res=res, device=args.device,
                                             warmup=args.warmup, batches=args.batches, runs=args.runs)
                        emit_line(f"{backend} {split} {res}{tag} + GPU augmentation", med, baseline=baselines.get(res),
                                  res=res, img_per_s_runs=[round(r, 1) for r in rates], **common,
                                  augment="A3: " + RAND_AUGMENT + ", mixup/cutmix, normalise",
                                  augment_compiled=augment.compiled)
                except Exception as e:  # named, and the other backends are still measured
                    print(f"# {backend}{tag}: skipped, {failure(e)}", flush=True)
                    break
                finally:
                    loader = None
    print(f"# {'measurement':40} {'img/s':>9} {'vs timm':>8}", flush=True)
    for rec in out:
        ratio = rec.get("ratio")
        print(f"# {rec['name']:40} {rec['value']:>9.1f} {'' if ratio is None else f'{ratio:.2f}x':>8}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return out
