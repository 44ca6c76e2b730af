"""Learning rate as a pure function of the optimizer step: linear warmup, then cosine decay.

Follows timm's `CosineLRScheduler` (the scheduler ResNet Strikes Back used: `--sched cosine
--warmup-epochs 5`) with one cycle and `warmup_prefix=False`, the timm default: the cosine runs over
the whole run, from step 0, and the warmup replaces its first `warmup_steps` steps:

    step < warmup_steps:  warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    otherwise:            min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2
    step >= total_steps:  min_lr

So the lr just after warmup is base_lr * (1 + cos(pi * warmup / total)) / 2, slightly under base_lr,
exactly as in timm.

Differences from timm's training script, on purpose:
- timm updates the lr once per epoch by default (`t_in_epochs=True`); fastrsb updates it every step.
  At each epoch's first step the two agree: `lr_at(e * steps_per_epoch, epochs * steps_per_epoch,
  warmup_epochs * steps_per_epoch, ...)` equals timm's lr for epoch e (tested). Within an epoch
  timm holds the lr constant; fastrsb keeps moving along the same curve. Per-step values equal timm's
  with `t_in_epochs=False` (timm's `--sched-on-updates`).
- timm's train.py warms up from a small `--warmup-lr` (1e-6 in older timm releases, 1e-5 in newer
  ones; which one the RSB runs used is *unverified*). This function's default is 0 (the first step
  then only fills the optimizer's moments); `fastrsb.train` passes warmup_lr=1e-6 and min_lr=0.
"""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0,
          warmup_lr: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of a `total_steps`-step run."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / total_steps))


def res_at(epoch: int, train_res: int, progressive_res: tuple[int, int] = (0, 0),
           progressive_epochs: tuple[int, int] = (0, 0), step_px: int = 32) -> int:
    """The train resolution of `epoch`: `train_res`, or with progressive resizing (FFCV's ImageNet
    example: 160 -> 192 over epochs) a linear ramp from progressive_res[0] at progressive_epochs[0] to
    progressive_res[1] at progressive_epochs[1], rounded down to a multiple of `step_px`."""
    lo, hi = progressive_res
    if (lo, hi) == (0, 0):
        return train_res
    start, end = progressive_epochs
    t = min(max((epoch - start) / max(end - start, 1), 0.0), 1.0)
    res = lo + (hi - lo) * t
    return max(step_px, int(res) // step_px * step_px)
