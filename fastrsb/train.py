"""Train a timm model with an RSB recipe at a fixed global batch, on 1..N GPUs (or the CPU).

`train` builds the run (`_build`: processes, batch layout, loaders, augmentation, model, optimizer,
resume) and then runs one flat loop: for every optimizer step set the lr from `schedule.lr_at`, feed
`accum_steps` augmented micro-batches to the one `TrainStep` (fastrsb/step.py, which the benchmarks
time too), log; at every epoch's end evaluate when due and write an atomic checkpoint. Every record goes
through one `log(...)` (fastrsb/runlog.py: log.jsonl, and TensorBoard scalars when it is installed); the
final weights are model.pt, and model.safetensors + config.json in timm's hub format (fastrsb/checkpoint.py).

Interruptions (README, "Reliability"): SIGTERM or SIGUSR1 makes every rank stop after the same step with
a mid-epoch checkpoint (fastrsb/preempt.py; exit status 75), and `--checkpoint-every-steps N` writes one
every N steps. A mid-epoch checkpoint holds the step within its epoch; `--resume` starts the loaders at
the next batch (`Loader.set_epoch(start_batch=)`: the plan is a pure function of seed and epoch, so
nothing before it is read) and ends bit-identical to a run never stopped. The run folder has one
writer: rank 0 holds its lock (fastrsb/lock.py) for the whole run. Under torchrun a process that dies
makes the others' next collective fail (gloo: at once; a hung one: after --dist-timeout); they stop
with a message naming the last checkpoint, and `--auto-resume` lets `torchrun --max-restarts` relaunch
the same command.

Where the work happens (STYLE.md): the loader (`fastrsb.loaders.make_loader`) yields uint8 NCHW
channels-last images and int64 labels already on the device, flipped and cropped; the augmentation
(`fastrsb.augment.make_train_augment`: RandAugment, mixup/cutmix, normalise) runs as batch operations on
the device, drawing from its own `torch.Generator` (saved in checkpoints). The loop never branches on
the loader backend. Processes, precision and the batch layout: fastrsb/runtime.py; checkpoints:
fastrsb/checkpoint.py; evaluation: fastrsb/evaluate.py.

Host-device synchronisations are marked `# sync:`; in steady state there is one per `log_every_steps`
optimizer steps (the logged loss, which is also the non-finite check), plus fp16's GradScaler check.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import runmeta
from .benchlog import Timer
from .checkpoint import (CHECKPOINT, EMA_WEIGHTS, FINAL_WEIGHTS, CHECKPOINT_FORMAT, capture_rng, load_checkpoint,
                         restore_rng, save_hub_files)
from .errors import FastRSBError
from .evaluate import evaluate_model
from .lock import FolderInUse, OutputLock
from .loss import make_loss
from .optim import Lamb, ModelEma, make_param_groups
from .preempt import StopRequests
from .prefetch import AugmentedBatches
from .recipes import Recipe
from .runlog import LOG, RunLog, tensorboard_dir, truncate_log
from .runtime import (BatchLayout, DistInfo, autocast, autocast_dtype, create_model, plan_batches, probe_batch_per_gpu,
                      release_memory, resolve_precision, seed_everything, setup_distributed)
from .schedule import lr_at, res_at
from .step import TrainStep, check_compile_mode, compile_augment, default_compile_mode

REFERENCE_GLOBAL_BATCH = 2048  # the recipes' lr is the lr at this global batch


@dataclass
class _Run:
    """Everything the loop needs, built once by `_build`."""

    recipe: Recipe
    model_name: str
    out: Path
    dist: DistInfo
    layout: BatchLayout
    precision: str
    train_loader: object
    val_loader: object
    augment: Callable
    augment_generator: torch.Generator
    normalize: Callable
    model: torch.nn.Module
    ema: ModelEma | None
    step_fn: TrainStep
    base_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start_epoch: int
    step: int
    history: list
    classes: list | None
    start_epoch_step: int = 0  # optimizer steps of start_epoch already done (a mid-epoch checkpoint)
    partial: dict | None = None  # that epoch's running loss sums and train time, from the checkpoint
    checkpoint_at: str | None = None  # where the latest checkpoint of out/ falls (`_checkpoint_at`), once known


def train(
    recipe: Recipe,
    data: str | os.PathLike,
    loader_backend: str = "auto",
    model_name: str | None = None,
    out_dir: str | os.PathLike = "runs/run",
    *,
    batch_per_gpu: int | str = "auto",
    device: str | torch.device | None = None,
    precision: str = "auto",
    compile_mode: str | None = None,
    eval_every_epochs: int = 10,
    log_every_steps: int = 50,
    resume: bool | str | os.PathLike = False,
    seed: int = 0,
    num_workers: int | None = None,
    hw_decoder_load: float | None = None,
    lamb_max_grad_norm: float | None = 1.0,
    warmup_lr: float = 1e-6,
    min_lr: float = 0.0,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    checkpoint_every_steps: int | None = None,
    dist_timeout_s: float = 600.0,
    tensorboard: str | os.PathLike | bool | None = None,
    make_loader: Callable | None = None,
    make_augment: Callable | None = None,
    normalize: Callable | None = None,
) -> dict:
    """Train `model_name` (default `recipe.model`) on the converted dataset `data`; returns the summary.

    batch_per_gpu: the micro-batch per process; "auto" (the default on CUDA) probes the largest that
        fits (runtime.probe_batch_per_gpu); on the CPU "auto" means 256. Accumulation makes up the rest
        of `recipe.global_batch` (runtime.plan_batches).
    precision: auto (bf16 on CUDA if recipe.mixed_precision, else fp32), bf16, fp16 (with GradScaler), fp32.
    compile_mode: see fastrsb.step.COMPILE_MODES; default "default" on CUDA, "none" on the CPU.
    lamb_max_grad_norm: LAMB's global gradient-norm clip (timm's default 1.0; None or 0: off); see
        fastrsb/optim.py. `recipe.grad_clip > 0` adds timm's `--clip-grad` on top.
    resume: True continues from out_dir/checkpoint.pt (at an epoch's end or mid-epoch); a path names the
        checkpoint; "auto" continues when out_dir holds a checkpoint and starts afresh when it holds
        nothing (for `torchrun --max-restarts` and requeued jobs, which rerun the same command).
    hw_decoder_load: DALI's share of JPEGs for the hardware decoder (mixed only; None: the loader's
        default, 1.0); other loaders ignore it.
    stop_after_epochs: stop (checkpoint written) after this many epochs of the schedule, as an
        interruption would; the run can then be resumed.
    checkpoint_every_steps: also write the checkpoint every N optimizer steps within an epoch.
    dist_timeout_s: how long a collective waits for the other processes before it fails (torchrun);
        a process that died is noticed at once by gloo, by NCCL's watchdog within this time.
    tensorboard: where rank 0 writes TensorBoard events of the log's figures (fastrsb/runlog.py). None:
        out_dir/tensorboard when the `tensorboard` extra is installed, else nowhere; False: nowhere; a
        path (or True, for out_dir/tensorboard): there, and an error up front without the extra.

    SIGTERM / SIGUSR1: the run stops after the current step with a checkpoint; the summary then has
    "stopped_by" (the signal's name) and "finished" false (fastrsb/preempt.py).
    make_loader, make_augment, normalize: substitutes for fastrsb.loaders.make_loader,
        fastrsb.augment.make_train_augment and fastrsb.augment.normalize, with the same contracts.
    """
    recipe.validate()
    for name, value in (("--eval-every", eval_every_epochs), ("--log-every", log_every_steps)):
        if not isinstance(value, int) or value < 1:
            raise FastRSBError(f"{name} {value!r}: give a whole number of at least 1")
    if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
        raise FastRSBError(f"--hw-decoder-load {hw_decoder_load}: give a share of JPEGs between 0 and 1 (default 1.0)")
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise FastRSBError(f"stop_after_epochs {stop_after_epochs}: give at least 1")
    every = checkpoint_every_steps
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise FastRSBError(f"--checkpoint-every-steps {checkpoint_every_steps!r}: give a whole number of at least 1")
    tensorboard_events = tensorboard_dir(tensorboard, Path(out_dir))
    if resume == "auto":
        resume = (Path(out_dir) / CHECKPOINT).is_file()
    dist_info = setup_distributed(device, timeout_s=dist_timeout_s)
    run, lock = None, None
    try:
        ckpt_path = _start_point(Path(out_dir), resume)  # before the lock, which makes the folder
        lock = _lock_run_folder(Path(out_dir), dist_info)  # held for the whole run
        run = _build(recipe, data, loader_backend, model_name or recipe.model, Path(out_dir), dist_info,
                     ckpt_path, batch_per_gpu=batch_per_gpu, precision=precision, compile_mode=compile_mode,
                     resume=resume, seed=seed, num_workers=num_workers, hw_decoder_load=hw_decoder_load,
                     lamb_max_grad_norm=lamb_max_grad_norm,
                     warmup_lr=warmup_lr, min_lr=min_lr, make_loader=make_loader, make_augment=make_augment,
                     normalize=normalize)
        last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
        return _loop(run, last_epoch, eval_every_epochs=eval_every_epochs, log_every_steps=log_every_steps,
                     progress=progress, min_lr=min_lr, warmup_lr=warmup_lr,
                     checkpoint_every_steps=checkpoint_every_steps, tensorboard_events=tensorboard_events)
    except RuntimeError as e:
        # NCCL raises DistError; gloo a RuntimeError from its transport (its source path in the message)
        if dist_info.enabled and (isinstance(e, dist.DistError) or "gloo" in str(e).lower()):
            raise FastRSBError(_lost_contact(e, dist_info, Path(out_dir), run)) from None
        raise
    finally:
        if lock is not None:
            lock.release()
        dist_info.close()


def _lost_contact(e: BaseException, dist_info: DistInfo, out: Path, run: _Run | None) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    ckpt = out / CHECKPOINT
    if not ckpt.is_file():
        where = "no checkpoint was written yet: relaunch without --resume (or with --auto-resume)"
    else:
        at = f" ({run.checkpoint_at})" if run is not None and run.checkpoint_at else ""
        where = f"the last checkpoint is {ckpt}{at}: relaunch the same command with --resume (or --auto-resume)"
    return (f"process {dist_info.rank} of {dist_info.world_size} lost contact with the others ({first[:200]}): "
            f"another process died or hung (out of memory, an NCCL error, a lost node; see its output); {where}")


def _checkpoint_at(epoch: int, step: int, epoch_step: int) -> str:
    """Where a checkpoint falls, in words (`epoch` and `epoch_step` as stored: see fastrsb/checkpoint.py)."""
    return f"epoch {epoch + 1}, step {step}" if epoch_step else f"after epoch {epoch}, step {step}"


def _start_point(out: Path, resume) -> Path:
    """The checkpoint a run resumes from (`resume`: True, or a path), refusing a missing one, and a new
    run into a folder that already holds one."""
    ckpt_path = Path(resume) if isinstance(resume, (str, os.PathLike)) else out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise FastRSBError(f"--resume: no checkpoint at {ckpt_path}")
    elif (out / CHECKPOINT).exists() or (out / FINAL_WEIGHTS).exists():
        raise FastRSBError(f"{out} already holds a run (checkpoint.pt or model.pt); pass --resume to continue "
                           f"it, or choose another --out")
    return ckpt_path


def _lock_run_folder(out: Path, dist_info: DistInfo) -> OutputLock | None:
    """Rank 0 takes the run folder's lock (fastrsb/lock.py); under DDP every rank learns whether it did,
    so a refused run stops on every rank with the same one-line message."""
    lock, refusal = None, None
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = OutputLock(out, "train").acquire()
        except FolderInUse as e:
            refusal = str(e)
    if dist_info.enabled:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise FolderInUse(refusal)
    return lock


def _build(recipe, data, loader_backend, model_name, out, dist_info, ckpt_path, *, batch_per_gpu, precision,
           compile_mode, resume, seed, num_workers, hw_decoder_load, lamb_max_grad_norm, warmup_lr, min_lr, make_loader,
           make_augment, normalize) -> _Run:
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    say = dist_info.say

    # --- precision, compilation, batch layout
    precision = resolve_precision(precision, device, recipe.mixed_precision)
    compile_mode = check_compile_mode(compile_mode or default_compile_mode(device))
    if batch_per_gpu == "auto" and resume and (out / "run.json").is_file():
        # the same micro-batches as before the interruption, or the plan (and the run) would change
        batch_per_gpu = json.loads((out / "run.json").read_text())["layout"]["batch_per_gpu"]
        why = "the resumed run's"
    elif batch_per_gpu == "auto" and device.type == "cuda":
        per_rank = recipe.global_batch // world_size  # plan_batches below refuses a global batch that does not divide
        batch_per_gpu = _probe_batch(recipe, model_name, device, precision, per_rank, say,
                                     loader_reserve(loader_backend, recipe, num_workers, data))
        why = "the largest micro-batch that fits (probed)"
    elif batch_per_gpu == "auto":
        batch_per_gpu, why = 256, "the CPU default"
    else:
        batch_per_gpu, why = int(batch_per_gpu), "--batch-per-gpu"
    layout = plan_batches(recipe.global_batch, world_size, batch_per_gpu, device.type)
    if (recipe.mixup_alpha > 0 or recipe.cutmix_alpha > 0) and layout.batch_per_gpu % 2:
        raise FastRSBError(f"mixup/cutmix pair each image with another: the per-GPU batch "
                           f"({layout.describe()}) must be even")
    base_lr = recipe.lr * recipe.global_batch / REFERENCE_GLOBAL_BATCH
    say(f"fastrsb train: recipe {recipe.name}, model {model_name}, {recipe.epochs} epochs at {recipe.train_res} px, "
        f"loader {loader_backend}, device {device}, {precision}, compile {compile_mode}")
    say(f"  {layout.describe()} (per-GPU batch: {why})")
    if recipe.global_batch != REFERENCE_GLOBAL_BATCH:
        say(f"  lr {recipe.lr:g} is the recipe's lr at global batch {REFERENCE_GLOBAL_BATCH}; scaled linearly "
            f"to {base_lr:g} for global batch {recipe.global_batch}")

    # --- data and augmentation
    seed_everything(seed)
    if make_loader is None:
        from .loaders import make_loader
    if make_augment is None:
        from .augment import make_train_augment as make_augment
    if normalize is None:
        from .augment import normalize
    common = dict(device=device, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers)
    if hw_decoder_load is not None:
        common["hw_decoder_load"] = hw_decoder_load
    train_loader = make_loader(loader_backend, data, "train", batch_size=layout.batch_per_gpu,
                               res=res_at(0, recipe.train_res, recipe.progressive_res, recipe.progressive_epochs),
                               aug_repeats=recipe.aug_repeats, drop_last=True, scale=tuple(recipe.rrc_scale),
                               ratio=tuple(recipe.rrc_ratio), hflip=recipe.hflip, interpolation=recipe.interpolation,
                               accum_steps=layout.accum_steps, **common)
    val_loader = make_loader(loader_backend, data, "val", batch_size=layout.batch_per_gpu, res=recipe.test_res,
                             crop_pct=recipe.test_crop_pct, drop_last=False, **common)
    num_classes = train_loader.num_classes
    steps_per_epoch = len(train_loader) // layout.accum_steps
    if steps_per_epoch == 0:
        raise FastRSBError(f"the train split ({train_loader.num_samples} images) is smaller than one global batch "
                           f"({recipe.global_batch}); lower global_batch")
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = recipe.warmup_epochs * steps_per_epoch
    say(f"  {train_loader.num_samples} train images, {num_classes} classes, {steps_per_epoch} optimizer steps "
        f"per epoch, {total_steps} in all ({warmup_steps} warmup), base lr {base_lr:g}")
    try:
        from .augment import recipe_augment_kwargs

        augment = make_augment(num_classes=num_classes, dtype=autocast_dtype(precision), **recipe_augment_kwargs(recipe))
    except ValueError as e:
        raise FastRSBError(f"recipe {recipe.name}: rand_augment={recipe.rand_augment!r}: {e}") from None
    compile_augment(augment, device, compile_mode)
    # A CPU generator: the augmentation takes its random decisions on the host, so drawing them needs no sync.
    augment_generator = torch.Generator()
    augment_generator.manual_seed(seed * 1_000_003 + rank + 1)  # each rank draws its own augmentations

    # --- model, optimizer, step
    model = create_model(model_name, num_classes, recipe.drop_path_rate, recipe.dropout)  # same init on every rank
    model.to(device=device, memory_format=torch.channels_last)
    seed_everything(seed + rank)  # but each rank its own drop-path masks (as timm's train.py: seed + rank)
    optimizer = Lamb(make_param_groups(model, recipe.weight_decay), lr=base_lr, max_grad_norm=lamb_max_grad_norm,
                     compile_update=compile_mode != "none")
    ema = ModelEma(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    step_fn = TrainStep(model, optimizer, make_loss(recipe), device=device, precision=precision,
                        accum_steps=layout.accum_steps, grad_clip=recipe.grad_clip, compile_mode=compile_mode,
                        ddp=dist_info.enabled, ema=ema)

    start_epoch, step, history, start_epoch_step, partial = 0, 0, [], 0, None
    if resume:
        ckpt = load_checkpoint(ckpt_path, recipe.to_dict(), model_name)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run was not fp16
            step_fn.scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        start_epoch_step = int(ckpt.get("epoch_step", 0))  # 0: an epoch's end (formats 1 and 2 are)
        if start_epoch_step:
            if ckpt.get("steps_per_epoch") != steps_per_epoch:
                raise FastRSBError(f"{ckpt_path} stopped at step {start_epoch_step} of an epoch of "
                                   f"{ckpt.get('steps_per_epoch')} steps; this run's epochs have {steps_per_epoch} "
                                   f"(another dataset or batch layout): resume with the same data and layout")
            partial = {k: ckpt[k] for k in ("epoch_loss", "interval_loss", "interval_steps", "epoch_train_s")}
        history = list(ckpt.get("history", []))
        if len(ckpt["rng"]) == world_size:
            restore_rng(ckpt["rng"][rank], augment_generator)
        else:
            say(f"  warning: checkpoint from {len(ckpt['rng'])} processes, now {world_size}: RNG streams restart "
                f"from the seed, so the continuation is equivalent but not identical")
            seed_everything(seed + 7919 * start_epoch + rank)
            augment_generator.manual_seed(seed * 1_000_003 + 7919 * start_epoch + rank + 1)
        say(f"  resumed from {ckpt_path}: {_checkpoint_at(start_epoch, step, start_epoch_step)}"
            + (f" (its step {start_epoch_step} of {steps_per_epoch})" if start_epoch_step else ""))
        del ckpt
        if dist_info.is_main:
            truncate_log(out / LOG, step)

    classes = getattr(train_loader, "classes", None)
    if dist_info.is_main:
        runmeta.write_atomic(out / "run.json", json.dumps({
            "recipe": recipe.to_dict(), "model_name": model_name, "num_classes": num_classes, "classes": classes,
            "data": str(data), "loader_backend": getattr(train_loader, "backend", loader_backend),
            "layout": dataclasses.asdict(layout), "base_lr": base_lr, "warmup_lr": warmup_lr, "min_lr": min_lr,
            "lamb_max_grad_norm": lamb_max_grad_norm, "precision": precision, "compile_mode": compile_mode,
            "device": str(device), "seed": seed, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "versions": runmeta.versions(), "git_revision": runmeta.git_revision(short=False), "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": str(ckpt_path) if resume else None},
            indent=2, default=str) + "\n")
    return _Run(recipe, model_name, out, dist_info, layout, precision, train_loader, val_loader, augment,
                augment_generator, normalize, model, ema, step_fn, base_lr, steps_per_epoch, total_steps,
                warmup_steps, start_epoch, step, history, classes, start_epoch_step, partial,
                _checkpoint_at(start_epoch, step, start_epoch_step) if resume else None)


def _loop(run: _Run, last_epoch: int, *, eval_every_epochs: int, log_every_steps: int, progress: bool,
          min_lr: float, warmup_lr: float, checkpoint_every_steps: int | None = None,
          tensorboard_events: Path | None = None) -> dict:
    # a run resumes at its checkpoint's step (a fresh one starts at 0): TensorBoard hides what came after it
    log = RunLog(run.out, enabled=run.dist.is_main, tensorboard=tensorboard_events, resumed_at=run.step or None)
    if tensorboard_events is not None:
        run.dist.say(f"  TensorBoard events in {tensorboard_events} (tensorboard --logdir {tensorboard_events})")
    stops = StopRequests(run.dist)
    stops.install()
    try:
        return _steps(run, last_epoch, stops, log, eval_every_epochs=eval_every_epochs,
                      log_every_steps=log_every_steps, progress=progress, min_lr=min_lr, warmup_lr=warmup_lr,
                      checkpoint_every_steps=checkpoint_every_steps)
    finally:
        stops.close()
        log.close()


def _steps(run: _Run, last_epoch: int, stops: StopRequests, log: RunLog, *, eval_every_epochs: int,
           log_every_steps: int, progress: bool, min_lr: float, warmup_lr: float,
           checkpoint_every_steps: int | None) -> dict:
    recipe, device, dist_info, layout = run.recipe, run.dist.device, run.dist, run.layout
    t_start = time.perf_counter()
    images_per_step = recipe.global_batch
    say = dist_info.say

    def evaluate(model) -> dict:
        return evaluate_model(model, run.val_loader, device=device, precision=run.precision,
                              normalize=run.normalize, dist_info=dist_info)

    step, train_time_s, images_seen, metrics = run.step, 0.0, 0, {}
    run.model.train()
    draws_per_epoch = run.steps_per_epoch * layout.accum_steps

    def res_of(epoch: int) -> int:
        return res_at(epoch, recipe.train_res, recipe.progressive_res, recipe.progressive_epochs)

    first_step = run.start_epoch_step  # of run.start_epoch: a mid-epoch checkpoint's
    skipped = first_step * layout.accum_steps  # micro-batches of that epoch already trained on

    def loader_batches():
        # the epochs' loaders chained: the next epoch is opened when its first batch is prefetched
        for epoch in range(run.start_epoch, last_epoch):
            start = skipped if epoch == run.start_epoch else 0
            if start:  # the plan is a pure function of (seed, epoch): the batches before `start` are not read
                run.train_loader.set_epoch(epoch, res=res_of(epoch), start_batch=start)
            else:  # a loader made by `make_loader=` need not know start_batch until a run resumes mid-epoch
                run.train_loader.set_epoch(epoch, res=res_of(epoch))
            epoch_batches = iter(run.train_loader)
            for _ in range(draws_per_epoch - start):
                yield next(epoch_batches)

    def draw_at(epoch: int, epoch_step: int) -> int:
        """The draw (micro-batch, numbered from the start of run.start_epoch) after this step."""
        return (epoch - run.start_epoch) * draws_per_epoch + epoch_step * layout.accum_steps

    # loader -> augmentation, batch k+1 prepared on a side CUDA stream while step k runs, across epochs too
    batches = AugmentedBatches(loader_batches(), run.augment, run.augment_generator, device,
                               count=(last_epoch - run.start_epoch) * draws_per_epoch - skipped, start=skipped)
    stopped_by, epochs_done = None, run.start_epoch
    for epoch in range(run.start_epoch, last_epoch):
        res = res_of(epoch)
        resumed = epoch == run.start_epoch and run.partial is not None
        if resumed:  # the sums of the steps before the checkpoint, so the epoch's records are the same
            epoch_loss = run.partial["epoch_loss"].to(device)
            interval_loss = run.partial["interval_loss"].to(device)
            interval_steps, train_before = int(run.partial["interval_steps"]), float(run.partial["epoch_train_s"])
        else:
            epoch_loss = torch.zeros((), device=device)
            interval_loss = torch.zeros((), device=device)
            interval_steps, train_before = 0, 0.0
        interval_t0 = time.perf_counter()
        timer = Timer(device).start()
        bar = _progress_bar(run.steps_per_epoch, f"epoch {epoch + 1}/{recipe.epochs}", progress and dist_info.is_main)
        first = first_step if epoch == run.start_epoch else 0
        bar.update(first)
        for epoch_step in range(first + 1, run.steps_per_epoch + 1):
            lr = lr_at(step, run.total_steps, run.warmup_steps, run.base_lr, min_lr, warmup_lr)
            for group in run.step_fn.optimizer.param_groups:
                group["lr"] = lr
            interval_loss += run.step_fn(next(batches) for _ in range(layout.accum_steps))
            step += 1
            interval_steps += 1
            bar.update(1)
            if step % log_every_steps == 0:
                loss_value = _all_mean(interval_loss.clone(), dist_info).item() / interval_steps  # sync: once per interval
                _check_finite(loss_value, step, epoch, run.out)
                img_s = interval_steps * images_per_step / (time.perf_counter() - interval_t0)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{img_s:,.0f}", lr=f"{lr:.2e}",
                                run_eta=_fmt_time((run.total_steps - step) * images_per_step / img_s))
                log({"kind": "step", "epoch": epoch, "step": step, "lr": lr, "loss": loss_value,
                     "img_per_s": img_s, "time_s": time.perf_counter() - t_start})
                epoch_loss += interval_loss
                interval_loss.zero_()
                interval_steps, interval_t0 = 0, time.perf_counter()
            stop = stops.should_stop()  # the same answer on every rank (fastrsb/preempt.py)
            periodic = checkpoint_every_steps is not None and step % checkpoint_every_steps == 0
            if (stop or periodic) and epoch_step < run.steps_per_epoch:  # else the epoch's end checkpoints
                partial = {"epoch_loss": epoch_loss.detach().cpu(), "interval_loss": interval_loss.detach().cpu(),
                           "interval_steps": interval_steps, "epoch_train_s": train_before + timer.stop()}  # sync
                _save_checkpoint(run, epoch, step, batches.generator_state_at(draw_at(epoch, epoch_step)),
                                 epoch_step=epoch_step, partial=partial)
                log({"kind": "checkpoint", "epoch": epoch, "step": step, "epoch_step": epoch_step,
                     "reason": stops.received if stop else f"every {checkpoint_every_steps} steps"})
            if stop:
                stopped_by = stops.received or "a signal to another process"
                break
        bar.close()
        images_seen += (epoch_step - first) * images_per_step  # by this process (a resumed epoch: since then)
        if stopped_by is not None and epoch_step < run.steps_per_epoch:
            train_time_s += timer.stop()  # sync: the run is stopping
            say(f"stopped by {stopped_by} at step {epoch_step} of epoch {epoch + 1} (step {step}); checkpoint "
                f"written to {run.out / CHECKPOINT}: rerun with --resume to continue")
            break
        epoch_loss += interval_loss
        epoch_train_s = train_before + timer.stop()  # sync: end of epoch (inside Timer)
        loss_value = _all_mean(epoch_loss, dist_info).item() / run.steps_per_epoch  # sync: end of epoch
        _check_finite(loss_value, step, epoch, run.out)
        train_time_s += epoch_train_s - train_before

        record = {"kind": "epoch", "epoch": epoch, "step": step, "loss": loss_value, "lr": lr,
                  "res": res, "train_time_s": epoch_train_s,
                  "img_per_s": run.steps_per_epoch * images_per_step / epoch_train_s}
        if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == recipe.epochs:
            metrics = evaluate(run.model)
            record.update(top1=metrics["top1"], top5=metrics["top5"])
            if run.ema is not None:
                ema_metrics = evaluate(run.ema.module)
                record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
                metrics.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
        run.history.append(record)
        log(record)
        say(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss_value:.4f}, {record['img_per_s']:,.0f} img/s"
            + (f", top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%" if "top1" in record else ""))
        _save_checkpoint(run, epoch + 1, step, batches.generator_state_at(draw_at(epoch + 1, 0)))
        epochs_done = epoch + 1
        if stopped_by is not None:
            say(f"stopped by {stopped_by} at the end of epoch {epoch + 1} (step {step}); checkpoint written to "
                f"{run.out / CHECKPOINT}: rerun with --resume to continue")
            break

    # --- the end
    finished = epochs_done == recipe.epochs
    if finished and dist_info.is_main:
        runmeta.save_atomic(run.model.state_dict(), run.out / FINAL_WEIGHTS)
        if run.ema is not None:
            runmeta.save_atomic(run.ema.module.state_dict(), run.out / EMA_WEIGHTS)
    if finished and not metrics:  # resumed after the last epoch's checkpoint: evaluate what was trained
        metrics = evaluate(run.model)
    summary = {
        "kind": "summary", "recipe": recipe.name, "model_name": run.model_name, "finished": finished,
        "epochs_done": epochs_done, "epochs": recipe.epochs, "steps": step, "layout": dataclasses.asdict(layout),
        "train_time_s": train_time_s, "wall_time_s": time.perf_counter() - t_start,
        "img_per_s": images_seen / train_time_s if train_time_s > 0 else None,
        "top1": metrics.get("top1"), "top5": metrics.get("top5"),
        "ema_top1": metrics.get("ema_top1"), "ema_top5": metrics.get("ema_top5"),
        "out_dir": str(run.out), "weights": str(run.out / FINAL_WEIGHTS) if finished else None,
        "stopped_by": stopped_by,
    }
    log(summary)
    if dist_info.is_main:
        run_info = json.loads((run.out / "run.json").read_text())
        run_info["summary"] = summary
        runmeta.write_atomic(run.out / "run.json", json.dumps(run_info, indent=2, default=str) + "\n")
        if finished:  # model.pt again, for timm and the hub; last, so no other rank waits on it in a collective
            save_hub_files(run.out)
        say("summary: " + json.dumps(summary))
    return summary


def _save_checkpoint(run: _Run, epoch: int, step: int, augment_state: torch.Tensor, *, epoch_step: int = 0,
                     partial: dict | None = None) -> None:
    """The checkpoint after `step`: at an epoch's end (epoch_step 0, `epoch` = the epochs done), or after
    step `epoch_step` of epoch `epoch` (0-based) with `partial`, that epoch's running sums."""
    rng = capture_rng(augment_state)
    if run.dist.enabled:
        gathered = [None] * run.dist.world_size
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    if run.dist.is_main:
        runmeta.save_atomic({
            "format": CHECKPOINT_FORMAT, "model": run.model.state_dict(),
            "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "optimizer": run.step_fn.optimizer.state_dict(), "scaler": run.step_fn.scaler.state_dict(),
            "step": step, "epoch": epoch, "epoch_step": epoch_step, "steps_per_epoch": run.steps_per_epoch,
            **(partial or {}),
            "rng": rng, "recipe": run.recipe.to_dict(), "model_name": run.model_name,
            "num_classes": run.train_loader.num_classes, "classes": run.classes, "history": run.history,
        }, run.out / CHECKPOINT)
    run.checkpoint_at = _checkpoint_at(epoch, step, epoch_step)


def loader_reserve(backend: str, recipe: Recipe, num_workers: int | None, data=None):
    """bytes(b): the GPU memory the train and val loaders will take outside torch's allocator at micro-batch
    b, for the batch probe to count (DALI's mixed pipelines; "auto" may choose DALI, so it counts them too).
    None for loaders that decode on the CPU. data: the converted folder, whose stored image sizes give
    nvJPEG's padding per thread (`decoder_padding`); without it, the largest padding is counted."""
    if backend not in ("dali", "auto"):
        return None
    from .loaders.registry import usable

    if not usable("dali"):
        return None
    from .loaders.dali_loader import _DEVICE_MEMORY_PADDING, decoder_padding, gpu_memory_estimate
    from .loaders.layout import ShardIndex

    paddings = {"train": _DEVICE_MEMORY_PADDING, "val": _DEVICE_MEMORY_PADDING}
    if data is not None:
        for split in paddings:
            try:
                index = ShardIndex.load(data, split)
            except FastRSBError:  # no DALI shards ("auto" reads another format): count the largest padding
                continue
            paddings[split] = decoder_padding(index.heights, index.widths)
    threads = num_workers or len(os.sched_getaffinity(0))
    train_res = _largest_train_res(recipe)
    return lambda b: (gpu_memory_estimate(b, train_res, threads, padding=paddings["train"])
                      + gpu_memory_estimate(b, recipe.test_res, threads, padding=paddings["val"]))


def _largest_train_res(recipe: Recipe) -> int:
    """The largest resolution the run trains at (progressive resizing may climb above train_res)."""
    return max([recipe.train_res, *(recipe.progressive_res or ())])


def _probe_batch(recipe: Recipe, model_name: str, device: torch.device, precision: str, per_rank: int, say,
                 reserve=None) -> int:
    """The largest micro-batch for which one real forward/backward of the model fits on this GPU with
    headroom, at the largest resolution the run will train at (progressive resizing may climb above
    train_res). reserve(b): bytes the loaders will take outside torch's allocator (`loader_reserve`),
    counted beside the probed peak."""
    model = create_model(model_name, 1000, recipe.drop_path_rate).to(device, memory_format=torch.channels_last)
    loss_fn = make_loss(recipe)
    res = _largest_train_res(recipe)
    total = torch.cuda.get_device_properties(device).total_memory

    def try_batch(b: int) -> float:
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(b, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
        target = torch.rand(b, 1000, device=device)
        try:
            with autocast(device, precision):
                loss = loss_fn(model(x), target)
            loss.backward()
            torch.cuda.synchronize(device)  # sync: start-up probe only
            return torch.cuda.max_memory_allocated(device) / total
        finally:
            model.zero_grad(set_to_none=True)

    key = f"{torch.cuda.get_device_name(device)}|{model_name}|{res}px|{precision}"
    reserved = None
    if reserve is not None:
        key += "|dali"
        reserved = lambda b: reserve(b) / total  # noqa: E731
    b = probe_batch_per_gpu(try_batch, per_rank, key, log=say, reserved=reserved)
    del model
    release_memory()  # the probe's model goes before the run's is built
    return b


def _all_mean(t: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.enabled:
        dist.all_reduce(t)
        t /= dist_info.world_size
    return t


def _check_finite(loss_value: float, step: int, epoch: int, out: Path) -> None:
    if math.isfinite(loss_value):
        return
    ckpt = out / CHECKPOINT
    kept = (f"the last good checkpoint, {ckpt}, is kept (resume with --resume)" if ckpt.exists()
            else "no checkpoint was written yet")
    raise FastRSBError(f"loss became {loss_value} by step {step} (epoch {epoch + 1}); training stopped and {kept}. "
                       f"Try a lower lr, precision fp32, or check the data.")


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, leave=False)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
