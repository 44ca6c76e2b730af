"""GPU batch augmentation for training, on uint8 NCHW device batches: RandAugment, mixup/cutmix, normalise.

Modules: `ops` (RandAugment's image ops and the affine warp, timm/PIL-faithful), `rand_augment`
(timm's RandAugment grammar, sampler and batch application), `mixup` (timm's Mixup/CutMix and the
smoothed one-hot targets), `pipeline` (the trainer's augmentation and `normalize`). Flip is not here:
the loaders flip, fused with the crop. Every call draws on the host and runs a fixed sequence of
kernels on the device (capturable; `make_train_augment(...).compile()`).
"""
from .mixup import MixupCutmix, smooth_one_hot
from .ops import OP_NAMES, SIGNED_OPS, TIMM_FILL, apply_op
from .pipeline import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, TrainAugment, make_train_augment, normalize,
                       recipe_augment_kwargs)
from .rand_augment import RAND_AUGMENT_GRAMMAR, RAND_INCREASING_OPS, RAND_OPS, RandAugment

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "MixupCutmix", "OP_NAMES", "RAND_AUGMENT_GRAMMAR",
    "RAND_INCREASING_OPS", "RAND_OPS", "RandAugment", "SIGNED_OPS", "TIMM_FILL", "TrainAugment", "apply_op",
    "make_train_augment", "normalize", "recipe_augment_kwargs", "smooth_one_hot",
]
