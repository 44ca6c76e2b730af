"""Mixup / CutMix on a device batch, and the one-hot targets with label smoothing they mix.

Semantics of timm 1.0 (`timm/data/mixup.py`, Ross Wightman): mixup, Zhang et al., arXiv 1710.09412;
CutMix, Yun et al., arXiv 1905.04899; label smoothing, Szegedy et al., arXiv 1512.00567.

λ, the mixup/cutmix switch and the cutmix boxes are drawn on the host (numpy) and reach the device
as one (batch, 6) float64 array in one pinned, non-blocking copy. The device part is the same in
every mode and for every draw: the box becomes a per-pixel mask, λ a tensor, and one lerp mixes each
image with its partner (image B-1-i), so it runs the same kernels every call and can be compiled.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .ops import check_images, host_rng, memory_format, to_device

NUM_COLUMNS = 6  # lam, use_cutmix, yl, yh, xl, xh


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """timm's one-hot with label smoothing: off = s / K, on = 1 - s + s / K (float32)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class MixupCutmix:
    """timm's Mixup/CutMix (timm.data.Mixup) on a device batch, in its 'batch', 'pair' and 'elem' modes.

    λ ~ Beta(α, α) drawn on the host per batch (mode 'batch'), per image ('elem') or per pair i,
    B-1-i ('pair'); with both alphas on, cutmix is chosen with probability switch_prob. The partner
    of image i is image B-1-i (the batch flipped). Cutmix boxes are clipped to the image and, with
    correct_lam, λ becomes 1 - box area / image area. uint8 images come back as float32 0..255.
    """

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1,
                 num_classes: int = 1000, cutmix_minmax: Sequence[float] | None = None, correct_lam: bool = True):
        if mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {mode!r}")
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (min, max), got {cutmix_minmax!r}")
            cutmix_alpha = 1.0  # as timm: minmax boxes switch cutmix on
        if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
            raise ValueError(f"need mixup_alpha > 0 or cutmix_alpha > 0, got {mixup_alpha!r}, {cutmix_alpha!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.correct_lam = bool(correct_lam)

    def _draw_lam(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(lam, use_cutmix) for n draws; lam is 1 where the mix_prob coin says no mixing."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(n) < self.switch_prob
            lam = np.where(use_cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, n),
                           rng.beta(self.mixup_alpha, self.mixup_alpha, n))
        elif self.mixup_alpha > 0:
            use_cutmix = np.zeros(n, dtype=bool)
            lam = rng.beta(self.mixup_alpha, self.mixup_alpha, n)
        else:
            use_cutmix = np.ones(n, dtype=bool)
            lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha, n)
        mixed = rng.random(n) < self.prob
        return np.where(mixed, lam, 1.0), use_cutmix & mixed

    def _boxes(self, rng: np.random.Generator, lam: np.ndarray, h: int, w: int):
        """Clipped cutmix boxes (yl, yh, xl, xh) and the corrected λ, as timm's cutmix_bbox_and_lam."""
        n = lam.shape[0]
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = rng.integers(int(h * lo), int(h * hi), size=n)
            cut_w = rng.integers(int(w * lo), int(w * hi), size=n)
            yl = rng.integers(0, h - cut_h + 1)
            xl = rng.integers(0, w - cut_w + 1)
            yh, xh = yl + cut_h, xl + cut_w
        else:
            ratio = np.sqrt(1.0 - lam)
            cut_h, cut_w = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
            cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
            yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
            xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        return (yl, yh, xl, xh), lam

    def sample_params(self, batch_size: int, height: int, width: int,
                      generator: torch.Generator | None = None, rng: np.random.Generator | None = None) -> dict:
        """Per-image λ (after box correction), cutmix flags and boxes (B, 4: yl, yh, xl, xh; empty
        where not cutmix), all numpy on the host. In 'batch' mode all rows are equal."""
        if batch_size % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size (partner of image i is B-1-i), got {batch_size}")
        rng = rng if rng is not None else host_rng(generator)
        n = {"batch": 1, "pair": batch_size // 2, "elem": batch_size}[self.mode]
        lam, use_cutmix = self._draw_lam(rng, n)
        boxes = np.zeros((n, 4), dtype=np.int64)
        if use_cutmix.any():
            (yl, yh, xl, xh), lam_cut = self._boxes(rng, lam[use_cutmix], height, width)
            boxes[use_cutmix] = np.stack([yl, yh, xl, xh], axis=1)
            lam = lam.copy()
            lam[use_cutmix] = lam_cut
        if self.mode == "batch":
            lam, use_cutmix, boxes = (np.repeat(a, batch_size, axis=0) for a in (lam, use_cutmix, boxes))
        elif self.mode == "pair":  # image B-1-i shares pair i's λ and box
            lam, use_cutmix, boxes = (np.concatenate([a, a[::-1]]) for a in (lam, use_cutmix, boxes))
        return dict(lam=lam.astype(np.float64), use_cutmix=use_cutmix, boxes=boxes)

    @staticmethod
    def pack(params: dict) -> np.ndarray:
        """Drawn params -> (batch, 6) float64: lam, use_cutmix, yl, yh, xl, xh."""
        return np.concatenate([params["lam"][:, None], params["use_cutmix"][:, None], params["boxes"]],
                              axis=1).astype(np.float64)

    def apply_packed(self, images: Tensor, labels: Tensor, packed: Tensor) -> tuple[Tensor, Tensor]:
        """The device part: images, int labels and `pack`'s array on their device -> (mixed, targets).
        The same kernels run whatever the draws; no host synchronisation."""
        b, _, h, w = images.shape
        x = images.float() if images.dtype == torch.uint8 else images
        lam = packed[:, 0].to(torch.float32)
        yl, yh, xl, xh = packed[:, 2:6].long().view(b, 4, 1, 1, 1).unbind(1)  # each (b, 1, 1, 1)
        ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
        xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
        in_box = (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)  # (b, 1, h, w)
        keep = torch.where(packed[:, 1].view(b, 1, 1, 1) > 0.5, (~in_box).to(x.dtype), lam.view(b, 1, 1, 1).to(x.dtype))
        out = torch.lerp(x.flip(0), x, keep)  # cutmix weight is 0/1 per pixel, mixup weight λ
        return out.contiguous(memory_format=memory_format(images)), self.targets(labels, packed)

    def targets(self, labels: Tensor, packed: Tensor) -> Tensor:
        """The mixed soft targets (B, num_classes) float32 for `pack`'s array on the labels' device."""
        lam = packed[:, 0].to(torch.float32).view(-1, 1)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return targets * lam + targets.flip(0) * (1.0 - lam)

    def _check(self, images: Tensor, labels: Tensor) -> None:
        check_images(images, "MixupCutmix", uint8=False)
        batch = images.shape[0]
        if labels.ndim != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must be shaped ({batch},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")

    def apply_params(self, images: Tensor, labels: Tensor, params: dict) -> tuple[Tensor, Tensor]:
        """Apply drawn params (from `sample_params`): one host-to-device copy, then `apply_packed`."""
        self._check(images, labels)
        return self.apply_packed(images, labels, to_device(self.pack(params), images.device))

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None,
                 rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
        """-> (mixed images, soft targets float32 (B, num_classes)); raises ValueError on an odd batch."""
        self._check(images, labels)
        params = self.sample_params(images.shape[0], images.shape[2], images.shape[3], generator, rng)
        return self.apply_params(images, labels, params)
