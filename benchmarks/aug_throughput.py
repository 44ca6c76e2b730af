"""How fast is fastrsb's batched RandAugment (and the whole train augmentation) against timm's and torchvision's?

One question, one script: images per second for a uint8 batch (default 256 at 160 px, RSB A3's
`rand-m6-mstd0.5-inc1`) already on the device, for
  * fastrsb.gpu_aug.RandAugment, per-sample ops, batched;
  * fastrsb.gpu_aug.make_train_augment: flip, RandAugment, mixup/cutmix (0.1 / 1.0), normalise to bf16;
  * timm's RandAugment, PIL, image by image on one CPU core (the baseline of every ratio);
  * torchvision.transforms.v2.RandAugment on the batch (one op draw for the whole batch) and image by image;
  * timm.data.Mixup on the device batch (mixup/cutmix alone, for scale).
Warm-up, several repeats, median; CUDA timed with events after a synchronize. Prints JSON lines.

    python benchmarks/aug_throughput.py [--device cpu|cuda] [--batch 256] [--res 160] [--repeats 5] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastrsb import gpu_aug

REPO = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_batch(batch: int, res: int, device: torch.device) -> torch.Tensor:
    """Smooth random colour fields plus noise: natural-ish statistics for histogram ops."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(batch, 3, 6, 6, generator=g) * 255
    x = F.interpolate(low, size=(res, res), mode="bicubic", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 8
    x = x.clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    return x.to(device)


def time_it(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rand-augment", default="rand-m6-mstd0.5-inc1")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 compares per core with the PIL baseline")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats, fewer per-image calls")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup, repeats = (1, 3) if args.quick else (2, args.repeats)
    per_image_n = min(args.batch, 16 if args.quick else 64)  # per-image baselines run on a slice

    import timm
    import torchvision
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.mixup import Mixup
    from torchvision.transforms import v2

    x = make_batch(args.batch, args.res, device)
    labels = torch.arange(args.batch, device=device) % 1000
    common = dict(device=device_name(device), torch=torch.__version__, timm=timm.__version__,
                  torchvision=torchvision.__version__, git=git_revision(), batch=args.batch, res=args.res,
                  rand_augment=args.rand_augment, repeats=repeats)

    # Baseline: timm's RandAugment as its loaders run it, PIL image by image in one process.
    import random
    random.seed(0)
    np.random.seed(0)
    timm_ra = rand_augment_transform(args.rand_augment, dict(translate_const=int(args.res * 0.45),
                                                             img_mean=(124, 116, 104)))
    pil_images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x[:per_image_n]]
    cpu = torch.device("cpu")
    t = time_it(lambda: [timm_ra(im) for im in pil_images], cpu, warmup, repeats)
    baseline = per_image_n / t

    def report(name: str, images_per_s: float, **extra) -> None:
        line = dict(benchmark=name, **common, img_per_s=round(images_per_s, 1),
                    ms_per_batch=round(1000 * args.batch / images_per_s, 3),
                    baseline="timm_randaugment_pil_1proc", baseline_img_per_s=round(baseline, 1),
                    ratio=round(images_per_s / baseline, 2), **extra)
        print(json.dumps(line), flush=True)

    report("timm_randaugment_pil_1proc", baseline, timed_images=per_image_n, timed_on="cpu")

    ra = gpu_aug.RandAugment.from_timm(args.rand_augment)
    gen = torch.Generator().manual_seed(0)
    t = time_it(lambda: ra(x, gen), device, warmup, repeats)
    report("fastrsb_randaugment", args.batch / t)

    train_aug = gpu_aug.make_train_augment(args.rand_augment, 0.1, 1.0, 0.0, 1000, dtype=torch.bfloat16)
    t = time_it(lambda: train_aug(x, labels, gen), device, warmup, repeats)
    report("fastrsb_train_augment", args.batch / t, pipeline="hflip+randaugment+mixup/cutmix+normalize(bf16)")

    mix = gpu_aug.MixupCutmix(0.1, 1.0, label_smoothing=0.0, num_classes=1000)
    t = time_it(lambda: gpu_aug.normalize(mix(x, labels, gen)[0], dtype=torch.bfloat16), device, warmup, repeats)
    report("fastrsb_mixup_cutmix_normalize", args.batch / t)

    timm_mix = Mixup(mixup_alpha=0.1, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=1000)
    xf = x.float()
    t = time_it(lambda: timm_mix(xf.clone(), labels), device, warmup, repeats)
    report("timm_mixup_cutmix", args.batch / t, note="float input, clone included")

    tv_ra = v2.RandAugment(num_ops=2, magnitude=18)  # 18 of 31 bins ~ timm's m6 of 10
    torch.manual_seed(0)
    t = time_it(lambda: tv_ra(x), device, warmup, repeats)
    report("torchvision_v2_randaugment_batch", args.batch / t, note="one op draw shared by the whole batch")
    t = time_it(lambda: [tv_ra(im) for im in x[:per_image_n]], device, warmup, repeats)
    report("torchvision_v2_randaugment_per_image", per_image_n / t, timed_images=per_image_n)


if __name__ == "__main__":
    main()
