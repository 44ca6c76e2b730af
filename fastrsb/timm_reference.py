"""The reference trainer: a recipe trained by timm's own code (`fastrsb train --loader timm`).

fastrsb promises timm's accuracy with faster pieces (its loaders, its batched RandAugment and mixup, its
LAMB). This module trains the same recipe the way timm's `train.py` does (timm 1.0, Ross Wightman), so a
sweep can put the two side by side (`fastrsb sweep --pipelines dali,ffcv,pil,timm`):

- data: `timm.data.create_dataset` over the SOURCE ImageFolder (the converted folder's manifest names
  it; the files it converted, with its labels), `timm.data.create_loader` with the recipe's train
  transform, RandAugment in its worker processes (`auto_augment=recipe.rand_augment`, timm's fill and
  translate constants), RRC scale / ratio, interpolation and flip, normalised by timm's prefetcher;
- `timm.data.Mixup` (mixup / cutmix, label smoothing) on the batch, `timm.loss.BinaryCrossEntropy`
  with the recipe's target threshold (or `SoftTargetCrossEntropy` for loss=ce);
- timm's LAMB from `timm.optim.create_optimizer_v2` (no weight decay on biases and norms, its own
  gradient-norm clip), timm's cosine schedule from `timm.scheduler.create_scheduler_v2` with the warmup,
  stepped per optimizer update (`step_update`) as timm's train.py does;
- the recipe's global batch (micro-batches with accumulation, as timm's `--grad-accum-steps`), lr
  scaled linearly from batch 2048, drop path, channels-last, bf16 autocast on CUDA.

Only the evaluation is fastrsb's: `evaluate_model` over the PIL backend's val split (the converted
folder's val keeps the source's bytes), so every pipeline of a sweep is scored by the same code on the
same pixels. The run folder is a `fastrsb train` run folder (run.json, log.jsonl with the same record
kinds and keys, checkpoint.pt, model.pt), so `fastrsb eval`, `report` and `sweep` read it unchanged.

Limits: one process (timm's repeated-augmentation sampler needs DDP, so A1/A2 need aug_repeats=0), no
EMA, no progressive resizing, eager (timm's train.py compiles only when asked), fp32 or bf16.
`--resume` continues from an epoch's end: timm's loader draws again from the seed and the epoch, so the
continuation is equivalent to, not bit-identical with, a run never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import runmeta
from .benchlog import Timer
from .checkpoint import CHECKPOINT, CHECKPOINT_FORMAT, FINAL_WEIGHTS, load_checkpoint
from .errors import FastRSBError
from .evaluate import check_classes, evaluate_model
from .loaders import layout
from .recipes import Recipe
from .runtime import autocast, create_model, plan_batches, resolve_precision, seed_everything, setup_distributed
from .runlog import truncate_log
from .train import REFERENCE_GLOBAL_BATCH, _check_finite, _lock_run_folder, _progress_bar, _start_point

NAME = "timm"  # the `--loader` value, and the pipeline's name in a sweep


def source_of(data: str | os.PathLike, split: str) -> tuple[Path, list[str], set[str] | None]:
    """(the source split folder, the class names, the relative paths of the files read or None for all).

    `data` is a folder `fastrsb convert` wrote (its manifest names the source; only the files it converted
    are read, with its labels), or a source ImageFolder holding `split/<class>/...`."""
    if layout.is_converted(data):
        manifest = layout.read_manifest(data, split)
        folder = Path(manifest["source"])
        if not folder.is_dir():
            raise FastRSBError(f"{layout.manifest_path(data, split)} names the source {folder}, which is gone; the "
                               f"timm reference reads the source images: restore it, or pass the ImageFolder as --data")
        rows = layout.read_samples(layout.samples_path(data, split))
        return folder, layout.read_classes(data), {Path(row["source"]).as_posix() for row in rows}
    folder = Path(data) / split
    if not folder.is_dir():
        raise FastRSBError(f"{data}: neither a folder fastrsb convert wrote nor an ImageFolder with {split}/<class>/ "
                           f"folders")
    return folder, layout.find_classes(folder), None


def make_timm_dataset(data, split: str = "train"):
    """timm's `create_dataset` over the source split, labels from the converted folder's classes."""
    from timm.data import create_dataset

    folder, classes, keep = source_of(data, split)
    dataset = create_dataset("", root=str(folder), split=split, is_training=split == "train",
                             class_map={name: i for i, name in enumerate(classes)})
    if keep is not None:  # what the converter read (rejected files stay out, as in the other pipelines)
        dataset.reader.samples = [(p, t) for p, t in dataset.reader.samples
                                  if Path(p).relative_to(folder).as_posix() in keep]
    if not dataset.reader.samples:
        raise FastRSBError(f"{folder}: timm's ImageFolder reader found none of the converted images")
    return dataset, classes


def make_timm_loader(recipe: Recipe, data, *, batch_size: int, device: torch.device, num_workers: int | None):
    """timm's train loader for `recipe`: RandAugment, RRC and flip in its workers, its prefetcher normalising."""
    from timm.data import create_loader

    from .loaders.imagefolder import use_worker_context

    dataset, classes = make_timm_dataset(data, "train")
    workers = len(os.sched_getaffinity(0)) if num_workers is None else num_workers
    loader = create_loader(
        dataset, input_size=(3, recipe.train_res, recipe.train_res), batch_size=batch_size, is_training=True,
        scale=tuple(recipe.rrc_scale), ratio=tuple(recipe.rrc_ratio), hflip=recipe.hflip, color_jitter=0.0,
        auto_augment=recipe.rand_augment or None, interpolation=recipe.interpolation, num_workers=workers,
        device=device, use_prefetcher=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    use_worker_context(loader)  # workers from the fork server, as fastrsb's PIL loader's
    return loader, classes


def make_mixup(recipe: Recipe, num_classes: int):
    """timm.data.Mixup for the recipe, or None when mixup and cutmix are off."""
    from timm.data import Mixup

    if recipe.mixup_alpha <= 0 and recipe.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha, prob=recipe.mixup_prob,
                 switch_prob=recipe.mixup_switch_prob, mode="batch", label_smoothing=recipe.label_smoothing,
                 num_classes=num_classes)


def make_timm_loss(recipe: Recipe, mixup_on: bool):
    """As timm's train.py: BCE with the target threshold (smoothing in Mixup when it is on)."""
    import timm.loss

    smoothing = 0.0 if mixup_on else recipe.label_smoothing
    if recipe.loss == "bce":
        return timm.loss.BinaryCrossEntropy(smoothing=smoothing, target_threshold=recipe.bce_target_thresh)
    if mixup_on:
        return timm.loss.SoftTargetCrossEntropy()
    return timm.loss.LabelSmoothingCrossEntropy(smoothing=smoothing) if smoothing else torch.nn.CrossEntropyLoss()


def train_batches(loader, mixup, device: torch.device):
    """(images, targets) as timm's train loop gets them: the prefetcher's normalised batch, mixed."""
    for images, labels in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        yield (images, labels) if mixup is None else mixup(images, labels)


def _refuse(recipe: Recipe, precision: str, compile_mode, world_size: int) -> None:
    why = []
    if world_size > 1:
        why.append("it runs in one process (start it without torchrun)")
    if recipe.aug_repeats:
        why.append(f"timm's repeated-augmentation sampler needs DDP (recipe {recipe.name} has aug_repeats="
                   f"{recipe.aug_repeats}: add aug_repeats=0)")
    if recipe.ema_decay > 0:
        why.append("it keeps no EMA (ema_decay=0)")
    if tuple(recipe.progressive_res) != (0, 0):
        why.append("it trains at one resolution (progressive_res=0,0)")
    if precision == "fp16":
        why.append("it runs fp32 or bf16 (--precision bf16)")
    if compile_mode not in (None, "none"):
        why.append("it runs eager (leave --compile-mode out)")
    if why:
        raise FastRSBError("--loader timm: " + "; ".join(why))


def train_reference(recipe: Recipe, data: str | os.PathLike, model_name: str | None = None,
                    out_dir: str | os.PathLike = "runs/run", *, batch_per_gpu: int | str = "auto",
                    device: str | torch.device | None = None, precision: str = "auto", compile_mode: str | None = None,
                    eval_every_epochs: int = 10, log_every_steps: int = 50, resume: bool | str = False, seed: int = 0,
                    num_workers: int | None = None, lamb_max_grad_norm: float | None = 1.0, warmup_lr: float = 1e-6,
                    min_lr: float = 0.0, progress: bool = True) -> dict:
    """Train `recipe` with timm's pipeline into `out_dir` (module docstring); returns the summary, as
    `fastrsb.train.train` does. batch_per_gpu "auto" is 256 (timm's loader has no memory probe)."""
    recipe.validate()
    model_name = model_name or recipe.model
    out = Path(out_dir)
    if resume == "auto":
        resume = (out / CHECKPOINT).is_file()
    dist_info = setup_distributed(device)
    lock = None
    try:
        device = dist_info.device
        precision = resolve_precision(precision, device, recipe.mixed_precision)
        _refuse(recipe, precision, compile_mode, dist_info.world_size)
        ckpt_path = _start_point(out, resume)
        lock = _lock_run_folder(out, dist_info)
        return _train(recipe, data, model_name, out, dist_info, ckpt_path if resume else None,
                      batch_per_gpu=256 if batch_per_gpu == "auto" else int(batch_per_gpu), precision=precision,
                      eval_every_epochs=eval_every_epochs, log_every_steps=log_every_steps, seed=seed,
                      num_workers=num_workers, lamb_max_grad_norm=lamb_max_grad_norm, warmup_lr=warmup_lr,
                      min_lr=min_lr, progress=progress)
    finally:
        if lock is not None:
            lock.release()
        dist_info.close()


def _train(recipe, data, model_name, out: Path, dist_info, ckpt_path, *, batch_per_gpu, precision, eval_every_epochs,
           log_every_steps, seed, num_workers, lamb_max_grad_norm, warmup_lr, min_lr, progress) -> dict:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import dispatch_clip_grad

    from .augment import normalize
    from .loaders import make_loader

    device, say = dist_info.device, dist_info.say
    layout_ = plan_batches(recipe.global_batch, 1, batch_per_gpu, device.type)
    if (recipe.mixup_alpha > 0 or recipe.cutmix_alpha > 0) and layout_.batch_per_gpu % 2:
        raise FastRSBError(f"mixup/cutmix pair each image with another: the batch ({layout_.describe()}) must be even")
    base_lr = recipe.lr * recipe.global_batch / REFERENCE_GLOBAL_BATCH  # timm's --lr-base scaling, linear
    say(f"fastrsb train (timm reference): recipe {recipe.name}, model {model_name}, {recipe.epochs} epochs at "
        f"{recipe.train_res} px, device {device}, {precision}")
    say(f"  {layout_.describe()}")

    seed_everything(seed)  # the loader's shuffle and its workers' seeds come from torch's generator, as in timm
    loader, classes = make_timm_loader(recipe, data, batch_size=layout_.batch_per_gpu, device=device,
                                       num_workers=num_workers)
    num_classes = len(classes)
    val_loader = make_loader("pil", data, "val", batch_size=layout_.batch_per_gpu, res=recipe.test_res,
                             crop_pct=recipe.test_crop_pct, drop_last=False, device=device, rank=0, world_size=1,
                             seed=seed, num_workers=num_workers)
    check_classes(classes, num_classes, val_loader, data)
    steps_per_epoch = len(loader) // layout_.accum_steps
    if steps_per_epoch == 0:
        raise FastRSBError(f"the train split ({len(loader.dataset)} images) is smaller than one global batch "
                           f"({recipe.global_batch}); lower global_batch")
    total_steps = recipe.epochs * steps_per_epoch
    say(f"  {len(loader.dataset)} train images (timm's reader over {source_of(data, 'train')[0]}), {num_classes} "
        f"classes, {steps_per_epoch} optimizer steps per epoch, base lr {base_lr:g}")

    model = create_model(model_name, num_classes, recipe.drop_path_rate, recipe.dropout)
    model.to(device=device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="lamb", lr=base_lr, weight_decay=recipe.weight_decay,
                                    max_grad_norm=lamb_max_grad_norm)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=recipe.epochs,
                                       warmup_epochs=recipe.warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    mixup = make_mixup(recipe, num_classes)
    loss_fn = make_timm_loss(recipe, mixup is not None)

    start_epoch, step, history = 0, 0, []
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, recipe.to_dict(), model_name)
        if ckpt.get("pipeline") != NAME:
            raise FastRSBError(f"{ckpt_path} was written by fastrsb's trainer, not the timm reference: resume it "
                               f"with its own --loader")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        seed_everything(seed + 7919 * start_epoch)  # timm's loader draws again: equivalent, not identical
        truncate_log(out / "log.jsonl", step)
        say(f"  resumed from {ckpt_path}: after epoch {start_epoch}, step {step}")
        del ckpt
    scheduler.step_update(step)  # the lr of the first update (warmup_lr at step 0)

    runmeta.write_atomic(out / "run.json", json.dumps({
        "recipe": recipe.to_dict(), "model_name": model_name, "num_classes": num_classes, "classes": classes,
        "data": str(data), "loader_backend": NAME, "train_source": str(source_of(data, "train")[0]),
        "layout": dataclasses.asdict(layout_), "base_lr": base_lr, "warmup_lr": warmup_lr, "min_lr": min_lr,
        "lamb_max_grad_norm": lamb_max_grad_norm, "precision": precision, "compile_mode": "none",
        "device": str(device), "seed": seed, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "versions": runmeta.versions(), "git_revision": runmeta.git_revision(short=False), "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": str(ckpt_path) if ckpt_path else None},
        indent=2, default=str) + "\n")

    log_file = open(out / "log.jsonl", "a" if ckpt_path else "w")

    def log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    def evaluate() -> dict:
        return evaluate_model(model, val_loader, device=device, precision=precision, normalize=normalize)

    t_start = time.perf_counter()
    train_time_s, images_seen, metrics, lr = 0.0, 0, {}, optimizer.param_groups[0]["lr"]
    model.train()
    for epoch in range(start_epoch, recipe.epochs):
        batches = train_batches(loader, mixup, device)
        epoch_loss = torch.zeros((), device=device)
        interval_loss = torch.zeros((), device=device)
        interval_steps, interval_t0 = 0, time.perf_counter()
        timer = Timer(device).start()
        bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{recipe.epochs} (timm)", progress)
        for _ in range(steps_per_epoch):
            lr = optimizer.param_groups[0]["lr"]
            step_loss = torch.zeros((), device=device)
            for _ in range(layout_.accum_steps):  # timm's --grad-accum-steps: the loss divided, one update
                images, targets = next(batches)
                with autocast(device, precision):
                    loss = loss_fn(model(images), targets) / layout_.accum_steps
                loss.backward()
                step_loss += loss.detach()
            if recipe.grad_clip > 0:
                dispatch_clip_grad(model.parameters(), recipe.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(num_updates=step)  # as timm's train.py, after every update
            interval_loss += step_loss
            interval_steps += 1
            bar.update(1)
            if step % log_every_steps == 0:
                loss_value = interval_loss.item() / interval_steps  # sync: once per interval
                _check_finite(loss_value, step, epoch, out)
                img_s = interval_steps * recipe.global_batch / (time.perf_counter() - interval_t0)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{img_s:,.0f}", lr=f"{lr:.2e}")
                log({"kind": "step", "epoch": epoch, "step": step, "lr": lr, "loss": loss_value, "img_per_s": img_s,
                     "time_s": time.perf_counter() - t_start})
                epoch_loss += interval_loss
                interval_loss.zero_()
                interval_steps, interval_t0 = 0, time.perf_counter()
        bar.close()
        batches.close()
        epoch_loss += interval_loss
        epoch_train_s = timer.stop()  # sync: end of epoch
        loss_value = epoch_loss.item() / steps_per_epoch
        _check_finite(loss_value, step, epoch, out)
        train_time_s += epoch_train_s
        images_seen += steps_per_epoch * recipe.global_batch
        record = {"kind": "epoch", "epoch": epoch, "step": step, "loss": loss_value, "lr": lr,
                  "res": recipe.train_res, "train_time_s": epoch_train_s,
                  "img_per_s": steps_per_epoch * recipe.global_batch / epoch_train_s}
        if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == recipe.epochs:
            metrics = evaluate()
            record.update(top1=metrics["top1"], top5=metrics["top5"])
        history.append(record)
        log(record)
        say(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss_value:.4f}, {record['img_per_s']:,.0f} img/s"
            + (f", top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%" if "top1" in record else ""))
        runmeta.save_atomic({
            "format": CHECKPOINT_FORMAT, "pipeline": NAME, "model": model.state_dict(), "ema": None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": {},
            "step": step, "epoch": epoch + 1, "epoch_step": 0, "steps_per_epoch": steps_per_epoch, "rng": [],
            "recipe": recipe.to_dict(), "model_name": model_name, "num_classes": num_classes, "classes": classes,
            "history": history}, out / CHECKPOINT)

    runmeta.save_atomic(model.state_dict(), out / FINAL_WEIGHTS)
    if not metrics:  # resumed after the last epoch's checkpoint
        metrics = evaluate()
    summary = {
        "kind": "summary", "recipe": recipe.name, "model_name": model_name, "finished": True,
        "epochs_done": recipe.epochs, "epochs": recipe.epochs, "steps": step, "layout": dataclasses.asdict(layout_),
        "train_time_s": train_time_s, "wall_time_s": time.perf_counter() - t_start,
        "img_per_s": images_seen / train_time_s if train_time_s > 0 else None,
        "top1": metrics.get("top1"), "top5": metrics.get("top5"), "ema_top1": None, "ema_top5": None,
        "out_dir": str(out), "weights": str(out / FINAL_WEIGHTS), "stopped_by": None,
    }
    log(summary)
    log_file.close()
    run_info = json.loads((out / "run.json").read_text())
    run_info["summary"] = summary
    runmeta.write_atomic(out / "run.json", json.dumps(run_info, indent=2, default=str) + "\n")
    say("summary: " + json.dumps(summary))
    return summary
