"""How many images per second does each loader backend deliver, against timm's own A3 loader?

Question: img/s of fastrsb's FFCV / DALI / PIL loaders (train: random-resized-crop + flip; val: resize
+ center crop), at 160 and 224, on this machine, compared with timm's `create_loader` over the source
ImageFolder with the A3 settings (RandAugment rand-m6-mstd0.5-inc1, RRC, flip, its prefetcher),
measured in the same run so the ratio holds on a noisy machine.

Method: one loader per (backend, split), built once (FFCV compiles once); per run, `set_epoch(e, res)`,
skip `--warmup` batches, time the next `--batches` batches (epochs chain if the dataset is small),
with a CUDA synchronisation at the end on a GPU; median of `--runs`. Images are consumed on the
loader's device (a sum per batch), nothing else. Output: one JSON line per measurement, with device,
versions and git revision; `--output FILE` appends them there too.

    python benchmarks/loader_throughput.py --demo --quick                 # anywhere, ~2 min on 2 cores
    python benchmarks/loader_throughput.py --data OUT --src SRC --device cuda --workers 16

Goal (issue 3): on one H100 with 16 cores, the train pipeline at 160 delivers >= 15,000 img/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "numpy", "pillow", "ffcv", "nvidia-dali-cuda120",
                "nvidia-dali-cuda130", "numba", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def batches_forever(loader, res, first_epoch: int):
    epoch = first_epoch
    while True:
        loader.set_epoch(epoch, res=res)
        yield from loader
        epoch += 1


def measure(loader, *, res, device, warmup: int, batches: int, runs: int):
    """Median img/s over `runs` timed windows of `batches` batches after `warmup` batches."""
    import torch

    cuda = device.startswith("cuda")
    rates = []
    for run in range(runs):
        it = batches_forever(loader, res, 1000 * run)
        sink = 0
        for _ in range(warmup):
            images, labels = next(it)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            images, labels = next(it)
            sink += int(images[:, :, 0, 0].sum()) if not cuda else 0  # consume on the host
            if cuda:
                images.float().sum()
            n += images.shape[0]
        if cuda:
            torch.cuda.synchronize()  # host-device sync: the end of the timed window
        rates.append(n / (time.perf_counter() - t0))
        it.close()
    return statistics.median(rates), rates


class TimmBaseline:
    """timm.data.create_loader over the source ImageFolder with the A3 train / test transforms."""

    def __init__(self, src: Path, split: str, *, res, batch_size, workers, device):
        import torch
        from timm.data import create_dataset, create_loader

        self.split, self.device = split, device
        ds = create_dataset("", root=str(src / split), split=split, is_training=split == "train")
        train = split == "train"
        self.loader = create_loader(
            ds, input_size=(3, res, res), batch_size=batch_size, is_training=train,
            auto_augment="rand-m6-mstd0.5-inc1" if train else None, color_jitter=0.0,
            interpolation="bilinear" if train else "bicubic", crop_pct=0.95, num_workers=workers,
            device=torch.device(device), use_prefetcher=True, pin_memory=device.startswith("cuda"),
            persistent_workers=True)

    def set_epoch(self, epoch, res=None):  # timm's input size is fixed at creation
        pass

    def __iter__(self):
        return iter(self.loader)


def make_demo(root: Path, per_class: int) -> tuple[Path, Path]:
    src, out = root / "src", root / "out"
    py = [sys.executable, "-m", "fastrsb"]
    subprocess.run(py + ["demo-data", str(src), "--classes", "10", "--train-per-class", str(per_class),
                         "--val-per-class", str(max(per_class // 3, 8)), "--min-size", "200", "--max-size", "400"],
                   check=True, cwd=REPO, capture_output=True)
    subprocess.run(py + ["convert", str(src), str(out), "--no-progress"], check=True, cwd=REPO, capture_output=True)
    return src, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch 64, 2 warm-up + 6 timed batches, 2 runs")
    p.add_argument("--output", type=Path, help="append the JSON lines to this file too")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.batches, args.runs = 64, 2, 6, 2
    workers = args.workers or len(os.sched_getaffinity(0))

    sys.path.insert(0, str(REPO))
    from fastrsb.data import backend_usable, make_loader

    tmp = None
    if args.demo:
        tmp = tempfile.TemporaryDirectory(prefix="fastrsb-bench-")
        args.src, args.data = make_demo(Path(tmp.name), args.demo_per_class)
    if args.data is None and args.src is None:
        p.error("pass --data OUT (and --src SRC for the baseline) or --demo")

    common = {"bench": "loader_throughput", "device": device_name(args.device), "device_type": args.device,
              "cpu_count": len(os.sched_getaffinity(0)), "workers": workers, "batch_size": args.batch_size,
              "warmup_batches": args.warmup, "timed_batches": args.batches, "runs": args.runs,
              "git": git_revision(), "versions": versions(), "data": str(args.data), "src": str(args.src)}
    sizes = [int(s) for s in args.sizes.split(",")]
    lines = []

    def emit(record):
        line = json.dumps({**common, **record})
        print(line, flush=True)
        lines.append(line)

    for split in args.splits.split(","):
        baselines = {}
        if args.src is not None and not args.no_baseline:
            for res in sizes:
                base = TimmBaseline(args.src, split, res=res, batch_size=args.batch_size, workers=workers,
                                    device=args.device)
                med, rates = measure(base, res=res, device=args.device, warmup=args.warmup, batches=args.batches,
                                     runs=args.runs)
                baselines[res] = med
                emit({"backend": "timm", "split": split, "res": res, "img_per_s": round(med, 1),
                      "img_per_s_runs": [round(r, 1) for r in rates],
                      "what": "timm create_loader, " + ("rand-m6-mstd0.5-inc1 + RRC + flip" if split == "train"
                                                        else "resize bicubic 0.95 + center crop")})
                del base
        for backend in args.backends.split(","):
            if backend != "pil" and not backend_usable(backend):
                emit({"backend": backend, "split": split, "skipped": "not installed"})
                continue
            data = args.data if args.data is not None else args.src
            t0 = time.perf_counter()
            loader = make_loader(backend, data, split, batch_size=args.batch_size, res=sizes[0], device=args.device,
                                 num_workers=workers, crop_pct=0.95, drop_last=True, verbose=False)
            build_s = time.perf_counter() - t0
            for res in sizes:
                med, rates = measure(loader, res=res, device=args.device, warmup=args.warmup, batches=args.batches,
                                     runs=args.runs)
                rec = {"backend": backend, "split": split, "res": res, "img_per_s": round(med, 1),
                       "img_per_s_runs": [round(r, 1) for r in rates], "build_s": round(build_s, 1)}
                if res in baselines:
                    rec["ratio_vs_timm"] = round(med / baselines[res], 2)
                emit(rec)
            del loader
    print(f"{'backend':8} {'split':6} {'res':>4} {'img/s':>9} {'vs timm':>8}", file=sys.stderr)
    for rec in map(json.loads, lines):
        if "img_per_s" in rec:
            ratio = rec.get("ratio_vs_timm")
            print(f"{rec['backend']:8} {rec['split']:6} {rec['res']:>4} {rec['img_per_s']:>9.1f} "
                  f"{'' if ratio is None else f'{ratio:.2f}x':>8}", file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
