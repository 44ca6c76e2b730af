"""Train augmentation throughput, like for like: RandAugment + mixup/cutmix + normalise on a uint8 batch.

    fastrsb bench aug [--device cuda] [--batches 256,2048] [--res 160] [--rand-augment rand-m6-mstd0.5-inc1]

Both sides do the same work on the same uint8 batch (default A3: `rand-m6-mstd0.5-inc1`, mixup 0.1 /
cutmix 1.0, normalise to bf16 on CUDA, float32 on the CPU):
  * fastrsb: `fastrsb.augment.make_train_augment` on the device batch, eager and compiled
    (`.compile()`: torch.compile of the device part; compile time excluded, reported beside);
  * baseline: timm's RandAugment (PIL, image by image, as in timm's loader workers: timed on one core on
    `--per-image` images, scaled to the batch and divided by the workers, one per core, so perfect
    scaling in timm's favour) + timm's `Mixup` on the device batch + the normalisation of timm's
    prefetcher. Its figure is the sum of the two measured parts.
Each line gives images/s, ms per batch and ms per 256 images. Warm-up, several repeats, median; timed
with the one `benchlog.Timer` (the compile too).

Before the timings, a traffic line per batch (`fastrsb.bench.traffic`): the MiB per image that the
eager device part reads and writes (a dispatch trace of one call) and its kernel count; the compiled
line adds Inductor's bytes and kernels for its graph. Each gives the floor those imply on one H100
(bytes at 3.35 TB/s, 5 us per launch) per 256 images. Target for the eager part: <= 8 MiB per image
at batch 512 and 2048 (what <= 0.6 ms per 256 allows at HBM speed). Goals on one H100 (issue 9):
<= 0.6 ms per 256 images when called on 2048 images,
<= 5 ms for a batch of 256, at 160 px.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from fastrsb.augment import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, make_train_augment
from fastrsb.augment.ops import to_device
from fastrsb.benchlog import Timer, emit, record, time_call
from fastrsb.loaders.loader import default_workers
from fastrsb.recipes import A3
from fastrsb.runtime import PRECISIONS, autocast_dtype, prepare_device, resolve_precision

from . import traffic

MIXUP_ALPHA, CUTMIX_ALPHA = 0.1, 1.0  # A1/A2/A3
EAGER_TARGET_MIB = 8.0  # per image, eager device part, batch 512 and 2048


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                        help="the trainer's --precision: the dtype both sides normalise to (auto: bf16 on CUDA, "
                             "float32 on the CPU)")
    parser.add_argument("--batches", default="256,2048", help="comma-separated batch sizes")
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rand-augment", default="rand-m6-mstd0.5-inc1")
    parser.add_argument("--per-image", type=int, default=64, help="images timm's per-image RandAugment is timed on")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled fastrsb line")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 compares per core with the PIL baseline")
    parser.add_argument("--timm-workers", type=int, default=0,
                        help="worker processes timm's per-image RandAugment is shared by (0: one per core, as timm's "
                             "loader would run it on this machine); its one-core time is divided by them")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats, 16 per-image calls")


def make_batch(batch: int, res: int, device) -> torch.Tensor:
    """Smooth random colour fields plus noise: natural-ish statistics for the histogram ops."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(batch, 3, 6, 6, generator=g) * 255
    x = F.interpolate(low, size=(res, res), mode="bicubic", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 8
    return x.clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last).to(device)


def _timm_seconds_per_batch(args, x, labels, device, dtype, warmup, repeats, per_image_n, workers) -> float:
    """timm: PIL RandAugment per image (scaled to the batch and shared by `workers` worker processes, one
    per core, as timm's loader runs it, with perfect scaling) + Mixup + prefetcher normalisation on the batch."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.mixup import Mixup

    random.seed(0)
    np.random.seed(0)
    # timm's create_transform: translate_const = 0.45 * img_size, img_mean as fill, 'random' interpolation
    timm_ra = rand_augment_transform(args.rand_augment, dict(translate_const=int(args.res * 0.45),
                                                             img_mean=(124, 116, 104)))
    pil_images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x[:per_image_n]]
    per_image_s = time_call(lambda: [timm_ra(im) for im in pil_images], None, warmup, repeats) / per_image_n
    mixup = Mixup(mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, label_smoothing=0.1, num_classes=1000)
    mean = torch.tensor([255 * m for m in IMAGENET_DEFAULT_MEAN], device=device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in IMAGENET_DEFAULT_STD], device=device).view(1, 3, 1, 1)

    def mix_and_normalise():  # timm's PrefetchLoader normalises (float, sub, div), then train.py mixes
        images = x.float().sub_(mean).div_(std).to(dtype)
        return mixup(images, labels)

    return per_image_s * x.shape[0] / workers + time_call(mix_and_normalise, device, warmup, repeats)


def device_part_traffic(augment, x, labels, seed: int = 1) -> traffic.Traffic:
    """The eager device part's traffic for one call's draws (host draws and the params copy left out)."""
    _, _, h, w = x.shape
    params = augment.sample_params(x.shape[0], h, w, torch.Generator().manual_seed(seed))
    packed, caps = augment.pack(params, h, w)
    consts = augment.constants(x.device, h, w)
    moved, _ = traffic.trace(augment.apply_packed, x, labels, to_device(packed, x.device), caps, consts)
    return moved


def traffic_fields(moved: traffic.Traffic, batch: int) -> dict:
    return {"kernels": moved.kernels, "h100_floor_ms_per_256_images": traffic.floor_ms(moved, batch),
            "top_ops": moved.top()}


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = prepare_device(args.device)
    dtype = autocast_dtype(resolve_precision(args.precision, device, A3.mixed_precision))
    warmup, repeats = (1, 3) if args.quick else (2, args.repeats)
    out = []
    for batch in (int(b) for b in str(args.batches).split(",")):
        x = make_batch(batch, args.res, device)
        labels = torch.arange(batch, device=device) % 1000
        per_image_n = min(batch, 16 if args.quick else args.per_image)
        config = {"batch": batch, "res": args.res, "rand_augment": args.rand_augment, "mixup_alpha": MIXUP_ALPHA,
                  "cutmix_alpha": CUTMIX_ALPHA, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
                  "torch_threads": torch.get_num_threads(), "timm_per_image_timed": per_image_n}
        workers = args.timm_workers or default_workers()
        config["timm_workers"] = workers
        timm_s = _timm_seconds_per_batch(args, x, labels, device, dtype, warmup, repeats, per_image_n, workers)
        base = (f"timm RandAugment (PIL, per image, {workers} worker process{'es' if workers > 1 else ''}, one per "
                f"core) + timm Mixup + normalise", batch / timm_s)

        def report(name: str, seconds: float, **extra) -> None:
            rec = record("aug", name, batch / seconds, config={**config, **extra}, baseline=base,
                         device=str(device), ms_per_batch=round(1000 * seconds, 3),
                         ms_per_256_images=round(1000 * seconds * 256 / batch, 3),
                         baseline_ms_per_batch=round(1000 * timm_s, 3))
            out.append(emit(rec, args.out))

        gen = torch.Generator().manual_seed(0)
        augment = make_train_augment(args.rand_augment, MIXUP_ALPHA, CUTMIX_ALPHA, 0.1, 1000, dtype=dtype)
        moved = device_part_traffic(augment, x, labels)
        out.append(emit(record("aug", "fastrsb augment traffic, eager device part", moved.per_image_mib(batch),
                               unit="MiB/image", config={**config, "target_mib_per_image": EAGER_TARGET_MIB},
                               device=str(device), **traffic_fields(moved, batch)), args.out))
        report("fastrsb RandAugment + mixup/cutmix + normalise, eager",
               time_call(lambda: augment(x, labels, gen), device, warmup, repeats))
        if args.no_compile:
            continue
        compiled = make_train_augment(args.rand_augment, MIXUP_ALPHA, CUTMIX_ALPHA, 0.1, 1000, dtype=dtype).compile()
        try:
            timer = Timer(device).start()
            compiled_moved = traffic.compiled_traffic(lambda: compiled(x, labels, gen), moved)  # compiles this shape
            compile_s = timer.stop()
        except Exception as e:  # e.g. no C++ compiler for inductor on this machine: say so, go on
            print(f"# compiled fastrsb augment skipped at batch {batch}: {type(e).__name__}: {str(e)[:200]}")
            continue
        seconds = time_call(lambda: compiled(x, labels, gen), device, warmup, repeats)
        # the same draws through both: how far compiled code is from eager on this device (on the CPU the
        # tests require equal pixels; a GPU's fused multiply-adds may move a truncation by a grey level)
        a = augment(x, labels, torch.Generator().manual_seed(1))[0].float()
        b = compiled(x, labels, torch.Generator().manual_seed(1))[0].float()
        report("fastrsb RandAugment + mixup/cutmix + normalise, compiled", seconds, compile_s=round(compile_s, 1),
               compiled_vs_eager_max_abs=float((a - b).abs().max()),
               compiled_vs_eager_mean_abs=float((a - b).abs().mean()))
        out.append(emit(record("aug", "fastrsb augment traffic, compiled", compiled_moved.per_image_mib(batch),
                               unit="MiB/image", config={**config, "eager_mib_per_image": round(
                                   moved.per_image_mib(batch), 3)}, device=str(device),
                               kernels=compiled_moved.kernels,
                               h100_floor_ms_per_256_images=traffic.floor_ms(compiled_moved, batch)), args.out))
    return out
