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
        off = smoothing / num_classes
        dense = torch.full_like(logits, off)
        dense.scatter_(1, target.long().unsqueeze(1), 1.0 - smoothing + off)
        target = dense
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
