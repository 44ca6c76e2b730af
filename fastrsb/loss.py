"""Binary cross-entropy for classification, as ResNet Strikes Back trains with it.

Semantics of `timm.loss.BinaryCrossEntropy` (timm 1.0), the loss behind RSB's `--bce-loss
--bce-target-thresh 0.2`:
- integer labels become one-hot targets, smoothed if asked: off = smoothing / C, on = 1 - smoothing + off;
- dense targets (already softened upstream by mixup/cutmix and label smoothing) are used as given;
- with a threshold, targets become `target > threshold` (so a mixed partner with weight above 0.2
  counts as fully present);
- then `binary_cross_entropy_with_logits`, mean over batch and classes.

The loss is computed in float32 whatever the autocast dtype of the logits: under bf16 autocast the
sum over 1000 classes and the batch would otherwise round.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment.mixup import smooth_one_hot


def bce_loss(logits: Tensor, target: Tensor, *, smoothing: float = 0.0,
             target_threshold: float | None = None) -> Tensor:
    """Mean BCE of `logits` (N, C) against int64 labels (N,) or dense targets (N, C)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    logits = logits.float()
    num_classes = logits.shape[-1]
    if target.shape != logits.shape:
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"targets of shape {tuple(target.shape)} fit neither labels (N,) nor logits {tuple(logits.shape)}")
        target = smooth_one_hot(target, num_classes, smoothing)
    else:
        target = target.float()
    if target_threshold is not None:
        target = (target > target_threshold).float()
    return F.binary_cross_entropy_with_logits(logits, target)


class BCELoss(nn.Module):
    """`bce_loss` as a module, configured once (e.g. from a recipe)."""

    def __init__(self, smoothing: float = 0.0, target_threshold: float | None = None):
        super().__init__()
        self.smoothing = smoothing
        self.target_threshold = target_threshold

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return bce_loss(logits, target, smoothing=self.smoothing, target_threshold=self.target_threshold)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, target_threshold={self.target_threshold}"


def soft_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against int64 labels (with label smoothing) or dense soft targets, in float32."""
    logits = logits.float()
    if target.shape != logits.shape:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    return torch.sum(-target.float() * F.log_softmax(logits, dim=-1), dim=-1).mean()


def make_loss(recipe):
    """The recipe's loss as `(logits, target) -> loss`: BCE with its target threshold (<= 0: none), or
    soft-target cross-entropy (`loss="ce"`)."""
    if recipe.loss == "bce":
        thresh = recipe.bce_target_thresh if recipe.bce_target_thresh > 0 else None
        return lambda logits, target: bce_loss(logits, target, smoothing=recipe.label_smoothing,
                                               target_threshold=thresh)
    if recipe.loss == "ce":
        return lambda logits, target: soft_cross_entropy(logits, target, recipe.label_smoothing)
    from .errors import FastRSBError

    raise FastRSBError(f"recipe loss {recipe.loss!r}: choose bce or ce")
