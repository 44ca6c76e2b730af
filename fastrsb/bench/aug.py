"""Augmentation throughput: fastrsb's batched per-sample RandAugment (and the trainer's whole augmentation)
against timm's RandAugment (PIL, image by image, one CPU core) and torchvision's v2 RandAugment.

Images per second for a uint8 batch (default 256 at 160 px, A3's `rand-m6-mstd0.5-inc1`) already on
the device, for
  * fastrsb.gpu_aug.RandAugment, per-sample ops, batched;
  * fastrsb.gpu_aug.make_train_augment: RandAugment, mixup/cutmix (0.1 / 1.0), normalise to bf16;
  * timm's RandAugment, PIL, image by image on one CPU core: the baseline of every ratio (what a timm
    loader worker does per core; multiply by the worker count for a whole loader);
  * torchvision.transforms.v2.RandAugment on the batch (one op draw for the whole batch) and image by image;
  * timm.data.Mixup on the device batch (mixup/cutmix alone).
Warm-up, several repeats, median; CUDA timed with events. Goal on one H100: RandAugment + mixup/cutmix
+ normalise for 256 images at 160 px in <= 5 ms (>= 50k img/s).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from fastrsb import gpu_aug
from fastrsb.benchlog import emit, record, time_call


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rand-augment", default="rand-m6-mstd0.5-inc1")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 compares per core with the PIL baseline")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats, fewer per-image calls")


def make_batch(batch: int, res: int, device) -> torch.Tensor:
    """Smooth random colour fields plus noise: natural-ish statistics for the histogram ops."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(batch, 3, 6, 6, generator=g) * 255
    x = F.interpolate(low, size=(res, res), mode="bicubic", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 8
    return x.clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last).to(device)


def run(args) -> list[dict]:
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.mixup import Mixup
    from torchvision.transforms import v2

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup, repeats = (1, 3) if args.quick else (2, args.repeats)
    per_image_n = min(args.batch, 16 if args.quick else 64)  # per-image contenders run on a slice
    x = make_batch(args.batch, args.res, device)
    labels = torch.arange(args.batch, device=device) % 1000
    config = {"batch": args.batch, "res": args.res, "rand_augment": args.rand_augment, "repeats": repeats,
              "torch_threads": torch.get_num_threads()}

    random.seed(0)
    np.random.seed(0)
    timm_ra = rand_augment_transform(args.rand_augment, dict(translate_const=int(args.res * 0.45),
                                                             img_mean=(124, 116, 104)))
    pil_images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x[:per_image_n]]
    baseline = per_image_n / time_call(lambda: [timm_ra(im) for im in pil_images], None, warmup, repeats)
    base = ("timm RandAugment, PIL, per image, 1 CPU core", baseline)
    out = []

    def report(name: str, images_per_s: float, **extra) -> None:
        rec = record("aug", name, images_per_s, config={**config, **extra}, baseline=base, device=str(device),
                     ms_per_batch=round(1000 * args.batch / images_per_s, 3))
        out.append(emit(rec, args.out))

    gen = torch.Generator().manual_seed(0)
    ra = gpu_aug.RandAugment.from_timm(args.rand_augment)
    report("fastrsb RandAugment (batched, per sample)", args.batch / time_call(lambda: ra(x, gen), device, warmup, repeats))
    train_aug = gpu_aug.make_train_augment(args.rand_augment, 0.1, 1.0, 0.0, 1000, hflip=0.0, dtype=torch.bfloat16)
    report("fastrsb RandAugment + mixup/cutmix + normalise (bf16)",
           args.batch / time_call(lambda: train_aug(x, labels, gen), device, warmup, repeats))
    mix = gpu_aug.MixupCutmix(0.1, 1.0, label_smoothing=0.0, num_classes=1000)
    report("fastrsb mixup/cutmix + normalise",
           args.batch / time_call(lambda: gpu_aug.normalize(mix(x, labels, gen)[0], dtype=torch.bfloat16), device,
                                  warmup, repeats))
    timm_mix = Mixup(mixup_alpha=0.1, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=1000)
    xf = x.float()
    report("timm Mixup (float input, clone included)",
           args.batch / time_call(lambda: timm_mix(xf.clone(), labels), device, warmup, repeats))
    tv_ra = v2.RandAugment(num_ops=2, magnitude=18)  # 18 of 31 bins ~ timm's m6 of 10
    torch.manual_seed(0)
    report("torchvision v2 RandAugment, one draw per batch",
           args.batch / time_call(lambda: tv_ra(x), device, warmup, repeats))
    report("torchvision v2 RandAugment, per image",
           per_image_n / time_call(lambda: [tv_ra(im) for im in x[:per_image_n]], device, warmup, repeats),
           timed_images=per_image_n)
    return out
