"""Train a timm model with an RSB recipe at a fixed global batch, on 1..N GPUs (or the CPU).

The run is one flat loop (`train`): build the model, optimizer and loaders, then for every optimizer
step set the lr from `fastrsb.schedule.lr_at`, run `accum_steps` micro-batches (DDP gradient sync only
on the last), step LAMB, update the EMA. Evaluation every `eval_every_epochs` epochs and at the end;
an atomic checkpoint at every epoch's end.

Fixed global batch: ResNet Strikes Back trains at global batch 2048 (Wightman et al. 2021, Table 1).
`plan_batches` splits `recipe.global_batch` into world_size x batch_per_gpu x accum_steps, with
batch_per_gpu at most the `max_batch_per_gpu` that fits in memory, so the optimisation is the same on 1
or 8 GPUs. The recipe's lr is the lr at global batch 2048; another `global_batch` scales it linearly
(and says so).

Where the work happens (STYLE.md): the loader (`fastrsb.data.make_loader`) yields uint8 NCHW
channels-last images and int64 labels already on the device; `fastrsb.augment.make_train_augment`
does RandAugment, mixup/cutmix and normalisation as batch operations on the device, with its own
`torch.Generator` (saved in checkpoints). The loop never branches on the loader backend.

Host-device synchronisations are marked `# sync:`; in steady state there is one per `log_every_steps`
optimizer steps (the logged loss, which is also the non-finite check), plus fp16's GradScaler check
when fp16 is chosen.

DDP: launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK); nccl on CUDA, gloo on the CPU. BatchNorm
statistics stay per GPU (no SyncBN), as in timm's RSB runs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from . import benchlog
from .errors import FastRSBError
from .convert import write_atomic
from .loss import make_loss
from .optim import Lamb, make_param_groups
from .recipes import Recipe
from .schedule import lr_at

REFERENCE_GLOBAL_BATCH = 2048  # the recipes' lr is the lr at this global batch
CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "model.pt"
EMA_WEIGHTS = "model_ema.pt"
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Batch layout, devices, precision


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    world_size: int
    batch_per_gpu: int
    accum_steps: int

    def describe(self) -> str:
        unit = "GPU" if self.world_size == 1 else "GPUs"
        return (f"global batch {self.global_batch} = {self.world_size} {unit} x {self.batch_per_gpu} per GPU "
                f"x {self.accum_steps} accumulation step{'s' if self.accum_steps > 1 else ''}")


def plan_batches(global_batch: int, world_size: int, max_batch_per_gpu: int) -> BatchLayout:
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
    return BatchLayout(global_batch, world_size, per_rank // accum_steps, accum_steps)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (nccl or gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastRSBError("device cuda was asked for but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        initialized_here = True
    return DistInfo(rank, world_size, local_rank, device, initialized_here)


def resolve_precision(precision: str | None, device: torch.device, mixed_precision: bool = True) -> str:
    """'auto': bf16 autocast on CUDA when the recipe asks for mixed precision, fp32 on the CPU."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" and mixed_precision else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise FastRSBError(f"precision {precision!r}: choose auto, bf16, fp16 or fp32")
    return precision


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_autocast_dtype(precision))


def _autocast_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# ----------------------------------------------------------------------------------------------
# Run metadata, RNG state, checkpoints


def versions() -> dict:
    """Library versions (fastrsb.benchlog.versions) plus what a training run also depends on."""
    info = benchlog.versions()
    info.update({"cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                 "platform": platform.platform()})
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def capture_rng(augment_generator: torch.Generator) -> dict:
    """All RNG states as tensors, lists and numbers, so `torch.load(weights_only=True)` reads them."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "augment": augment_generator.get_state(),
    }


def restore_rng(state: dict, augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    augment_generator.set_state(state["augment"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then os.replace: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


class ModelEma:
    """Exponential moving average of a model's parameters (buffers copied), updated after each step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - self.decay)
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, *, device: torch.device, precision: str,
                   normalize: Callable, dist_info: DistInfo | None = None) -> dict:
    """Top-1 / top-5 (%) over `loader`; in DDP the counts are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, samples
    for images, labels in loader:
        x = normalize(images, dtype=torch.float32)
        with _autocast(device, precision):
            logits = model(x)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        counts[2] += labels.shape[0]  # a Python number: no host-to-device copy
    if dist_info is not None and dist_info.enabled:
        dist.all_reduce(counts)
    top1_hits, top5_hits, n = counts.tolist()  # sync: once per evaluation
    model.train(was_training)
    if n == 0:
        raise FastRSBError("the validation split yielded no images")
    return {"top1": 100.0 * top1_hits / n, "top5": 100.0 * top5_hits / n, "samples": n}


def _default_make_loader():
    from .data import make_loader

    return make_loader


def _default_make_augment():
    from .augment import make_train_augment

    return make_train_augment


def _default_normalize():
    from .augment import normalize

    return normalize


def create_model(model_name: str, num_classes: int, drop_path_rate: float = 0.0) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise FastRSBError(f"timm has no model {model_name!r} (see timm.list_models())") from None
        raise


# ----------------------------------------------------------------------------------------------
# Training


def train(
    recipe: Recipe,
    data: str | os.PathLike,
    loader_backend: str = "auto",
    model_name: str | None = None,
    out_dir: str | os.PathLike = "runs/run",
    *,
    batch_per_gpu: int = 256,
    device: str | torch.device | None = None,
    precision: str = "auto",
    compile_model: bool | None = None,
    eval_every_epochs: int = 10,
    log_every_steps: int = 50,
    resume: bool | str | os.PathLike = False,
    seed: int = 0,
    num_workers: int | None = None,
    lamb_max_grad_norm: float | None = 1.0,
    warmup_lr: float = 1e-6,
    min_lr: float = 0.0,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    make_loader: Callable | None = None,
    make_augment: Callable | None = None,
    normalize: Callable | None = None,
) -> dict:
    """Train `model_name` (default `recipe.model`) on the converted dataset `data`; returns the summary.

    batch_per_gpu: the largest micro-batch that fits on one GPU; accumulation makes up the rest of
        `recipe.global_batch` (see `plan_batches`).
    precision: auto (bf16 on CUDA if recipe.mixed_precision, else fp32), bf16, fp16 (with GradScaler), fp32.
    compile_model: torch.compile the model; default on for CUDA, off on the CPU.
    lamb_max_grad_norm: LAMB's global gradient-norm clip (timm's default 1.0; None or 0: off). See
        fastrsb.optim for why 1.0 is the default. `recipe.grad_clip > 0` adds timm's `--clip-grad`
        on top (clip_grad_norm_ before the step).
    resume: True continues from out_dir/checkpoint.pt; a path names the checkpoint.
    stop_after_epochs: stop (checkpoint written) after this many epochs of the schedule, as an
        interruption would; the run can then be resumed.
    make_loader, make_augment, normalize: substitutes for fastrsb.data.make_loader,
        fastrsb.augment.make_train_augment and fastrsb.augment.normalize, with the same contracts.
    """
    t_start = time.perf_counter()
    model_name = model_name or recipe.model
    out = Path(out_dir)
    dist_info = setup_distributed(device)
    device = dist_info.device
    rank, world_size = dist_info.rank, dist_info.world_size

    def say(msg: str) -> None:
        if dist_info.is_main:
            print(msg, flush=True)

    try:
        # --- where we start from
        ckpt_path = Path(resume) if isinstance(resume, (str, os.PathLike)) else out / CHECKPOINT
        if resume:
            if not ckpt_path.is_file():
                raise FastRSBError(f"--resume: no checkpoint at {ckpt_path}")
        elif (out / CHECKPOINT).exists() or (out / FINAL_WEIGHTS).exists():
            raise FastRSBError(f"{out} already holds a run (checkpoint.pt or model.pt); pass --resume to continue "
                               f"it, or choose another --out")
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)

        precision = resolve_precision(precision, device, recipe.mixed_precision)
        if compile_model is None:
            compile_model = device.type == "cuda"
        layout = plan_batches(recipe.global_batch, world_size, batch_per_gpu)
        if (recipe.mixup_alpha > 0 or recipe.cutmix_alpha > 0) and layout.batch_per_gpu % 2:
            raise FastRSBError(f"mixup/cutmix pair each image with another: the per-GPU batch "
                               f"({layout.describe()}) must be even")
        base_lr = recipe.lr * recipe.global_batch / REFERENCE_GLOBAL_BATCH
        say(f"fastrsb train: recipe {recipe.name}, model {model_name}, {recipe.epochs} epochs at {recipe.train_res} px, "
            f"loader {loader_backend}, device {device}, {precision}, compile {'on' if compile_model else 'off'}")
        say(f"  {layout.describe()}")
        if recipe.hflip != 0.5:
            say(f"  warning: recipe hflip={recipe.hflip} is ignored: the loaders flip with p=0.5")
        if recipe.global_batch != REFERENCE_GLOBAL_BATCH:
            say(f"  lr {recipe.lr:g} is the recipe's lr at global batch {REFERENCE_GLOBAL_BATCH}; scaled linearly "
                f"to {base_lr:g} for global batch {recipe.global_batch}")

        # --- data, model, optimizer
        seed_everything(seed)
        make_loader = make_loader or _default_make_loader()
        make_augment = make_augment or _default_make_augment()
        normalize = normalize or _default_normalize()
        common = dict(device=device, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers)
        train_loader = make_loader(loader_backend, data, "train", batch_size=layout.batch_per_gpu,
                                   res=recipe.train_res, aug_repeats=recipe.aug_repeats, drop_last=True,
                                   scale=tuple(recipe.rrc_scale), ratio=tuple(recipe.rrc_ratio), **common)
        val_loader = make_loader(loader_backend, data, "val", batch_size=layout.batch_per_gpu, res=recipe.test_res,
                                 crop_pct=recipe.test_crop_pct, drop_last=False, **common)
        num_classes = train_loader.num_classes
        steps_per_epoch = len(train_loader) // layout.accum_steps
        if steps_per_epoch == 0:
            raise FastRSBError(f"the train split ({train_loader.num_samples} images) is smaller than one global batch "
                               f"({recipe.global_batch}); lower global_batch")
        total_steps = recipe.epochs * steps_per_epoch
        warmup_steps = recipe.warmup_epochs * steps_per_epoch
        images_per_step = recipe.global_batch
        say(f"  {train_loader.num_samples} train images, {num_classes} classes, {steps_per_epoch} optimizer steps "
            f"per epoch, {total_steps} in all ({warmup_steps} warmup), base lr {base_lr:g}")

        augment = make_augment(recipe.rand_augment, recipe.mixup_alpha, recipe.cutmix_alpha, recipe.label_smoothing,
                               num_classes, mixup_prob=recipe.mixup_prob,
                               switch_prob=recipe.mixup_switch_prob,
                               dtype=_autocast_dtype(precision))
        # A CPU generator: augment takes its random decisions on the host, so drawing them needs no sync.
        augment_generator = torch.Generator()
        augment_generator.manual_seed(seed * 1_000_003 + rank + 1)  # each rank draws its own augmentations
        loss_fn = make_loss(recipe)

        model = create_model(model_name, num_classes, recipe.drop_path_rate)  # same init on every rank
        model.to(device=device, memory_format=torch.channels_last)
        seed_everything(seed + rank)  # but each rank its own drop-path masks (as timm's train.py: seed + rank)
        if recipe.optimizer != "lamb":
            raise FastRSBError(f"recipe optimizer {recipe.optimizer!r}: fastrsb implements lamb")
        optimizer = Lamb(make_param_groups(model, recipe.weight_decay), lr=base_lr,
                         max_grad_norm=lamb_max_grad_norm)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        ema = ModelEma(model, recipe.ema_decay) if recipe.ema_decay > 0 else None

        start_epoch, step = 0, 0
        history: list[dict] = []
        if resume:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            _check_resumable(ckpt, recipe, model_name, ckpt_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:  # empty when the run was not fp16
                scaler.load_state_dict(ckpt["scaler"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.module.load_state_dict(ckpt["ema"])
            start_epoch, step = ckpt["loader"]["epoch"], ckpt["step"]
            history = list(ckpt.get("history", []))
            if len(ckpt["rng"]) == world_size:
                restore_rng(ckpt["rng"][rank], augment_generator)
            else:
                say(f"  warning: checkpoint from {len(ckpt['rng'])} processes, now {world_size}: RNG streams restart "
                    f"from the seed, so the continuation is equivalent but not identical")
                seed_everything(seed + 7919 * start_epoch + rank)
                augment_generator.manual_seed(seed * 1_000_003 + 7919 * start_epoch + rank + 1)
            say(f"  resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
            del ckpt

        train_model = torch.compile(model) if compile_model else model
        ddp = None
        if dist_info.enabled:
            ddp = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)
            train_model = ddp

        if dist_info.is_main:
            run_info = {"recipe": recipe.to_dict(), "model_name": model_name, "num_classes": num_classes,
                        "data": str(data), "loader_backend": getattr(train_loader, "backend", loader_backend),
                        "layout": dataclasses.asdict(layout), "base_lr": base_lr, "warmup_lr": warmup_lr,
                        "min_lr": min_lr, "lamb_max_grad_norm": lamb_max_grad_norm, "precision": precision,
                        "compile": compile_model, "device": str(device), "seed": seed,
                        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                        "versions": versions(), "git_revision": benchlog.git_revision(short=False), "argv": sys.argv,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": str(ckpt_path) if resume else None}
            _write_json(out / "run.json", run_info)
        log_file = open(out / "log.jsonl", "a") if dist_info.is_main else None

        def log(record: dict) -> None:
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()

        def all_mean(t: torch.Tensor) -> torch.Tensor:
            if dist_info.enabled:
                dist.all_reduce(t)
                t /= world_size
            return t

        # --- the loop
        last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
        train_time_s, images_seen = 0.0, 0
        metrics: dict = {}
        model.train()
        for epoch in range(start_epoch, last_epoch):
            train_loader.set_epoch(epoch)
            batches = iter(train_loader)
            epoch_loss = torch.zeros((), device=device)
            interval_loss = torch.zeros((), device=device)
            interval_steps, interval_t0 = 0, time.perf_counter()
            timer = _EpochTimer(device)
            bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{recipe.epochs}", progress and dist_info.is_main)
            for _ in range(steps_per_epoch):
                lr = lr_at(step, total_steps, warmup_steps, base_lr, min_lr, warmup_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(layout.accum_steps):
                    images, labels = next(batches)
                    x, target = augment(images, labels, generator=augment_generator)
                    x = x.contiguous(memory_format=torch.channels_last)
                    sync_grads = micro == layout.accum_steps - 1
                    with (ddp.no_sync() if ddp is not None and not sync_grads else contextlib.nullcontext()):
                        with _autocast(device, precision):
                            logits = train_model(x)
                        loss = loss_fn(logits, target) / layout.accum_steps
                        scaler.scale(loss).backward()
                    interval_loss += loss.detach()
                if recipe.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip, foreach=True)
                scaler.step(optimizer)  # sync: fp16 only (GradScaler checks for inf); a plain step otherwise
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                step += 1
                interval_steps += 1
                bar.update(1)

                if step % log_every_steps == 0:
                    loss_value = all_mean(interval_loss.clone()).item() / interval_steps  # sync: once per interval
                    _check_finite(loss_value, step, epoch, out)
                    now = time.perf_counter()
                    img_s = interval_steps * images_per_step / (now - interval_t0)
                    remaining = total_steps - step
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{img_s:,.0f}", lr=f"{lr:.2e}",
                                    run_eta=_fmt_time(remaining * images_per_step / img_s))
                    log({"kind": "step", "epoch": epoch, "step": step, "lr": lr, "loss": loss_value,
                         "img_per_s": img_s, "time_s": time.perf_counter() - t_start})
                    epoch_loss += interval_loss
                    interval_loss.zero_()
                    interval_steps, interval_t0 = 0, time.perf_counter()
            bar.close()
            epoch_loss += interval_loss
            epoch_train_s = timer.stop()  # sync: end of epoch
            loss_value = all_mean(epoch_loss).item() / steps_per_epoch  # sync: end of epoch
            _check_finite(loss_value, step, epoch, out)
            train_time_s += epoch_train_s
            images_seen += steps_per_epoch * images_per_step

            record = {"kind": "epoch", "epoch": epoch, "step": step, "loss": loss_value, "lr": lr,
                      "train_time_s": epoch_train_s, "img_per_s": steps_per_epoch * images_per_step / epoch_train_s}
            if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == recipe.epochs:
                metrics = evaluate_model(model, val_loader, device=device, precision=precision, normalize=normalize,
                                         dist_info=dist_info)
                record.update({"top1": metrics["top1"], "top5": metrics["top5"]})
                if ema is not None:
                    ema_metrics = evaluate_model(ema.module, val_loader, device=device, precision=precision,
                                                 normalize=normalize, dist_info=dist_info)
                    record.update({"ema_top1": ema_metrics["top1"], "ema_top5": ema_metrics["top5"]})
                    metrics.update({"ema_top1": ema_metrics["top1"], "ema_top5": ema_metrics["top5"]})
            history.append(record)
            log(record)
            say(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss_value:.4f}, {record['img_per_s']:,.0f} img/s"
                + (f", top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%" if "top1" in record else ""))

            rng = capture_rng(augment_generator)
            if dist_info.enabled:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, rng)
                rng = gathered
            else:
                rng = [rng]
            if dist_info.is_main:
                save_atomic({
                    "format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "step": step, "epoch": epoch + 1,
                    "loader": {"epoch": epoch + 1, "batch": 0},  # checkpoints fall on epoch boundaries
                    "rng": rng, "recipe": recipe.to_dict(), "model_name": model_name,
                    "num_classes": num_classes, "world_size": world_size, "seed": seed, "history": history,
                }, out / CHECKPOINT)

        # --- the end
        finished = last_epoch == recipe.epochs
        if finished and dist_info.is_main:
            save_atomic(model.state_dict(), out / FINAL_WEIGHTS)
            if ema is not None:
                save_atomic(ema.module.state_dict(), out / EMA_WEIGHTS)
        if finished and not metrics:  # resumed after the last epoch's checkpoint: evaluate what was trained
            metrics = evaluate_model(model, val_loader, device=device, precision=precision, normalize=normalize,
                                     dist_info=dist_info)
        summary = {
            "kind": "summary", "recipe": recipe.name, "model_name": model_name, "finished": finished,
            "epochs_done": last_epoch, "epochs": recipe.epochs, "steps": step, "layout": dataclasses.asdict(layout),
            "train_time_s": train_time_s, "wall_time_s": time.perf_counter() - t_start,
            "img_per_s": images_seen / train_time_s if train_time_s > 0 else None,
            "top1": metrics.get("top1"), "top5": metrics.get("top5"),
            "ema_top1": metrics.get("ema_top1"), "ema_top5": metrics.get("ema_top5"),
            "out_dir": str(out), "weights": str(out / FINAL_WEIGHTS) if finished else None,
        }
        log(summary)
        if log_file is not None:
            log_file.close()
        if dist_info.is_main:
            run_info = json.loads((out / "run.json").read_text())
            run_info["summary"] = summary
            _write_json(out / "run.json", run_info)
            say("summary: " + json.dumps(summary))
        return summary
    finally:
        if dist_info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _check_resumable(ckpt: dict, recipe: Recipe, model_name: str, path: Path) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FastRSBError(f"{path} is not a fastrsb checkpoint of format {CHECKPOINT_FORMAT}")
    saved, now = ckpt["recipe"], recipe.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise FastRSBError(f"{path} was trained with a different recipe (keys {', '.join(changed)}); resume with "
                           f"the same recipe and overrides")
    if ckpt["model_name"] != model_name:
        raise FastRSBError(f"{path} holds a {ckpt['model_name']}, not a {model_name}")


def _check_finite(loss_value: float, step: int, epoch: int, out: Path) -> None:
    if math.isfinite(loss_value):
        return
    ckpt = out / CHECKPOINT
    kept = (f"the last good checkpoint, {ckpt}, is kept (resume with --resume)" if ckpt.exists()
            else "no checkpoint was written yet")
    raise FastRSBError(f"loss became {loss_value} by step {step} (epoch {epoch + 1}); training stopped and {kept}. "
                       f"Try a lower lr, precision fp32, or check the data.")


class _EpochTimer:
    """Training time of one epoch: CUDA events on the GPU (no sync until the end), perf_counter otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1000.0
        return time.perf_counter() - self.t0


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, leave=False)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Evaluation of a finished run or checkpoint (`fastrsb eval`)


def load_for_eval(source: str | os.PathLike | torch.nn.Module, model_name: str | None = None,
                  num_classes: int | None = None) -> tuple[torch.nn.Module, dict]:
    """A model from a run folder (model.pt + run.json), a checkpoint.pt, or a bare state_dict file."""
    if isinstance(source, torch.nn.Module):
        return source, {}
    path = Path(source)
    info: dict = {}
    if path.is_dir():
        run_json = path / "run.json"
        if not run_json.is_file():
            raise FastRSBError(f"{path} has no run.json; pass a checkpoint or a model.pt with --model and --num-classes")
        info = json.loads(run_json.read_text())
        path = path / FINAL_WEIGHTS if (path / FINAL_WEIGHTS).is_file() else path / CHECKPOINT
    if not path.is_file():
        raise FastRSBError(f"no weights at {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        info = {"recipe": obj["recipe"], "model_name": obj["model_name"], "num_classes": obj["num_classes"], **info}
        state = obj["model"]
    else:
        state = obj
        if not info and path.parent.joinpath("run.json").is_file():
            info = json.loads(path.parent.joinpath("run.json").read_text())
    model_name = model_name or info.get("model_name")
    num_classes = num_classes or info.get("num_classes")
    if model_name is None or num_classes is None:
        raise FastRSBError(f"{path} does not say which model it holds; pass --model and --num-classes")
    model = create_model(model_name, num_classes)
    model.load_state_dict(state)
    return model, info


def evaluate(model_or_checkpoint, data: str | os.PathLike, backend: str = "auto", *, model_name: str | None = None,
             num_classes: int | None = None, res: int | None = None, crop_pct: float | None = None,
             batch_size: int = 256, device: str | torch.device | None = None, precision: str = "auto",
             num_workers: int | None = None, make_loader: Callable | None = None,
             normalize: Callable | None = None) -> dict:
    """Top-1 / top-5 of a model, run folder or checkpoint on the val split of `data`.

    Resolution and crop default to the run's recipe (test_res, test_crop_pct), else 224 and 0.95.
    """
    dist_info = setup_distributed(device)
    try:
        model, info = load_for_eval(model_or_checkpoint, model_name, num_classes)
        recipe = info.get("recipe") or {}
        res = res or recipe.get("test_res", 224)
        crop_pct = crop_pct or recipe.get("test_crop_pct", 0.95)
        precision = resolve_precision(precision, dist_info.device, recipe.get("mixed_precision", True))
        make_loader = make_loader or _default_make_loader()
        normalize = normalize or _default_normalize()
        loader = make_loader(backend, data, "val", batch_size=batch_size, res=res, device=dist_info.device,
                             rank=dist_info.rank, world_size=dist_info.world_size, crop_pct=crop_pct,
                             drop_last=False, num_workers=num_workers)
        model.to(device=dist_info.device, memory_format=torch.channels_last)
        result = evaluate_model(model, loader, device=dist_info.device, precision=precision, normalize=normalize,
                                dist_info=dist_info)
        result.update({"res": res, "crop_pct": crop_pct})
        if dist_info.is_main:
            print(json.dumps(result))
        return result
    finally:
        if dist_info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
