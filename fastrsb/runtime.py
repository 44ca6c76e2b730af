"""Where a run executes: processes (torchrun / DDP), device, precision, the batch layout, seeds.

Fixed global batch: ResNet Strikes Back trains at global batch 2048 (Wightman et al. 2021, Table 1).
`plan_batches` splits it into processes x batch_per_gpu x accum_steps, with batch_per_gpu at most what
fits in memory, so the optimisation is the same on 1 or 8 GPUs. `probe_batch_per_gpu` finds what fits:
a real forward/backward at start-up that halves on out-of-memory, cached per (GPU, model, res, precision).

BatchNorm statistics are computed per micro-batch on each GPU (no SyncBN), as in timm's RSB runs, whose
4-GPU A1-A3 runs normalised over 512 images per GPU. One GPU at batch 2048 normalises over 2048 images;
with accumulation, over each micro-batch.

DDP: launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK); nccl on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import FastRSBError


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    world_size: int
    batch_per_gpu: int
    accum_steps: int
    device_type: str = "cuda"

    def describe(self) -> str:
        unit = ("GPU" if self.world_size == 1 else "GPUs") if self.device_type == "cuda" else \
            ("CPU process" if self.world_size == 1 else "CPU processes")
        per = "per GPU" if self.device_type == "cuda" else "per process"
        return (f"global batch {self.global_batch} = {self.world_size} {unit} x {self.batch_per_gpu} {per} "
                f"x {self.accum_steps} accumulation step{'s' if self.accum_steps > 1 else ''}")


def plan_batches(global_batch: int, world_size: int, max_batch_per_gpu: int, device_type: str = "cuda") -> BatchLayout:
    """The fewest accumulation steps such that world_size * batch_per_gpu * accum_steps == global_batch
    and batch_per_gpu <= max_batch_per_gpu."""
    if global_batch <= 0 or max_batch_per_gpu <= 0:
        raise FastRSBError(f"global batch ({global_batch}) and --batch-per-gpu ({max_batch_per_gpu}) must be positive")
    if global_batch % world_size:
        raise FastRSBError(f"global batch {global_batch} does not divide over {world_size} processes; "
                           f"choose a global_batch that is a multiple of {world_size}")
    per_rank = global_batch // world_size
    accum_steps = math.ceil(per_rank / max_batch_per_gpu)
    while per_rank % accum_steps:
        accum_steps += 1
    return BatchLayout(global_batch, world_size, per_rank // accum_steps, accum_steps, device_type)


def prepare_device(device: str | torch.device) -> torch.device:
    """Make `device` this process's current device, set up as a run sets it up; the trainer
    (`setup_distributed`) and every benchmark call this, so a benchmark times the run's kernels.
    On CUDA: cuDNN benchmark mode (shapes are fixed per resolution, so cuDNN's autotuning pays once)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastRSBError(f"device {device} was asked for but torch sees no CUDA GPU; pass --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device


def release_memory() -> None:
    """Free what a finished model left behind before the next one is built (a benchmark's next side, the
    batch probe's next try): compiled graphs (torch._dynamo keeps the model's tensors alive), then
    unreachable objects, then the CUDA caching allocator's free blocks."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing was compiled
    if dynamo is not None:
        dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def say(self, msg: str) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(msg, flush=True)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str | torch.device | None = None, timeout_s: float | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device and join the process group.

    timeout_s: how long a collective waits for the others before it fails (None: torch's default, 10
    minutes for NCCL, 30 for gloo). A process that dies closes its connections, which gloo notices at
    once; NCCL's watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default: leave it on) notices within
    the timeout and ends the process, so no rank waits forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    device = prepare_device(device)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s) if timeout_s else None)
        initialized_here = True
    return DistInfo(rank, world_size, device, initialized_here)


PRECISIONS = ("bf16", "fp16", "fp32")


def resolve_precision(precision: str | None, device: torch.device, mixed_precision: bool = True) -> str:
    """'auto': bf16 autocast on CUDA when the recipe asks for mixed precision, fp32 on the CPU."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" and mixed_precision else "fp32"
    if precision not in PRECISIONS:
        raise FastRSBError(f"precision {precision!r}: choose auto, bf16, fp16 or fp32")
    return precision


def autocast_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype(precision))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def create_model(model_name: str, num_classes: int, drop_path_rate: float = 0.0, drop_rate: float = 0.0):
    import timm

    try:
        return timm.create_model(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                 drop_rate=drop_rate)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise FastRSBError(f"timm has no model {model_name!r} (see timm.list_models())") from None
        raise


# ----------------------------------------------------------------------------------------------
# The largest micro-batch that fits

PROBE_CACHE = Path(os.environ.get("FASTRSB_CACHE", Path.home() / ".cache" / "fastrsb")) / "batch-probe.json"


PROBE_MAX_MEMORY = 0.85  # of the GPU's memory: the rest is for prefetched batches, augmentation, DALI, EMA


def probe_batch_per_gpu(try_batch, per_rank: int, key: str, *, cache: Path | None = PROBE_CACHE, log=print,
                        max_memory: float = PROBE_MAX_MEMORY, reserved=None) -> int:
    """The largest divisor of `per_rank`, halving from per_rank, for which `try_batch(b)` runs without
    running out of memory and leaves headroom. `try_batch(b)` runs one real forward/backward at
    micro-batch b and returns the fraction of the GPU's memory it peaked at (None: not known); above
    `max_memory` the batch counts as not fitting, since a training step also holds the next batch,
    the augmentation's temporaries, the loader's buffers, the optimizer state and the EMA. The answer
    is cached under `key` (GPU, model, res, precision) so later runs skip the probe.

    reserved(b): the fraction of GPU memory that memory outside torch's allocator takes at micro-batch b
    (DALI's decoder buffers and queues, which are allocated only once the loaders run, after the probe);
    it counts against `max_memory` beside the probed peak."""
    store = {}
    if cache is not None and cache.is_file():
        try:
            store = json.loads(cache.read_text())
        except (OSError, ValueError):
            store = {}
    if key in store and per_rank % store[key] == 0:
        log(f"  batch per GPU {store[key]}: probed earlier for {key}")
        return int(store[key])
    b = per_rank
    while True:
        why = None
        try:
            used = try_batch(b)
            extra = reserved(b) if reserved is not None else 0.0
            if used is not None and used + extra > max_memory:
                why = (f"peaks at {used:.0%} of GPU memory" + (f" + {extra:.0%} for the loaders" if extra else "")
                       + f" (at most {max_memory:.0%} is kept for the step itself)")
        except torch.OutOfMemoryError:
            why = "runs out of memory"
        if why is None:
            break
        release_memory()  # outside the except block: its traceback no longer holds the activations
        smaller = b // 2
        while smaller > 1 and per_rank % smaller:
            smaller -= 1
        if smaller < 1 or smaller == b:
            raise FastRSBError(f"even a micro-batch of {b} {why} for {key}; use a smaller model or resolution")
        log(f"  batch per GPU {b} {why}; trying {smaller}")
        b = smaller
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            store[key] = b
            cache.write_text(json.dumps(store, indent=1) + "\n")
        except OSError:
            pass
    return b
