"""The ResNet Strikes Back training recipes A1, A2 and A3.

Wightman, Touvron, Jegou, "ResNet strikes back: An improved training procedure in timm",
arXiv 2110.00476, Table 1. The BCE target threshold 0.2 comes from timm's public command lines for
these recipes (`--bce-loss --bce-target-thresh 0.2`), not from the paper's table.

A2 is written out in full; A1 and A3 are `dataclasses.replace` of A2, so every difference from A2
stands on one line. Command-line overrides go through `override`, which rejects unknown keys and
values of the wrong type; every field is read by the trainer, the loaders or the augmentation, and
`Recipe.validate` refuses values that cannot train (epochs=0, lr=nan, ...).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass

from .errors import FastRSBError


class RecipeError(FastRSBError, ValueError):
    """A recipe name, key or value that cannot be used; the message names it and what is allowed."""


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    train_res: int
    test_res: int
    test_crop_pct: float
    global_batch: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: int
    schedule: str
    loss: str
    bce_target_thresh: float
    label_smoothing: float
    drop_path_rate: float
    aug_repeats: int  # 0: off; 3: each sample 3 times per epoch, epoch length unchanged
    rand_augment: str  # timm grammar
    mixup_alpha: float
    cutmix_alpha: float
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    dropout: float = 0.0  # classifier dropout (timm's drop_rate)
    grad_clip: float = 0.0  # 0: none (the paper lists none); see fastrsb.optim for LAMB's own clipping
    ema_decay: float = 0.0  # 0: no EMA
    hflip: float = 0.5  # probability of the horizontal flip, applied by the loader with the crop
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "random"  # train crop resize: bilinear, bicubic, or random (timm: one per image)
    # Progressive resizing as FFCV's ImageNet example does it, off in the RSB recipes: the train
    # resolution goes from progressive_res[0] to [1] between epochs progressive_epochs[0] and [1], in
    # steps of 32 px (fastrsb.schedule.res_at). (0, 0): off, train_res throughout.
    progressive_res: tuple[int, int] = (0, 0)
    progressive_epochs: tuple[int, int] = (0, 0)
    mixed_precision: bool = True
    model: str = "resnet50"
    # Top-1 the paper reports for ResNet-50 at 224 on ImageNet-val: the target, not a promise.
    paper_top1: float = 0.0

    def validate(self) -> "Recipe":
        """Raise RecipeError naming the first field whose value cannot train; return self otherwise."""
        def bad(key, allowed):
            raise RecipeError(f"recipe {self.name}: {key}={getattr(self, key)!r} is not usable; {allowed}")

        for key in ("lr", "weight_decay", "test_crop_pct", "label_smoothing", "drop_path_rate", "dropout",
                    "mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_switch_prob", "grad_clip", "ema_decay",
                    "hflip", "bce_target_thresh"):
            if not math.isfinite(getattr(self, key)):
                bad(key, "give a finite number")
        if self.epochs < 1:
            bad("epochs", "give at least 1")
        if not self.lr > 0:
            bad("lr", "give a positive learning rate (at global batch 2048), e.g. lr=0.008")
        if self.weight_decay < 0:
            bad("weight_decay", "give 0 or more")
        if self.global_batch < 1:
            bad("global_batch", "give a positive number of images per optimizer step")
        if self.train_res < 8 or self.test_res < 8:
            bad("train_res" if self.train_res < 8 else "test_res", "give at least 8 px")
        if not 0 < self.test_crop_pct <= 1:
            bad("test_crop_pct", "give a value in (0, 1]")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", "give 0 or more")
        if self.optimizer != "lamb":
            bad("optimizer", "fastrsb implements lamb")
        if self.schedule != "cosine":
            bad("schedule", "fastrsb implements cosine (with linear warmup)")
        if self.loss not in ("bce", "ce"):
            bad("loss", "choose bce or ce")
        for key in ("label_smoothing", "drop_path_rate", "dropout", "ema_decay", "bce_target_thresh"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, "give a value in [0, 1)")
        for key in ("mixup_prob", "mixup_switch_prob", "hflip"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, "give a probability in [0, 1]")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            bad("mixup_alpha" if self.mixup_alpha < 0 else "cutmix_alpha", "give 0 (off) or a positive alpha")
        if self.grad_clip < 0:
            bad("grad_clip", "give 0 (off) or a positive norm")
        if self.aug_repeats < 0 or self.aug_repeats > 255:
            bad("aug_repeats", "give 0 (off) or a repeat count such as 3")
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            bad("rrc_scale", "give 0 < min <= max <= 1, e.g. 0.08,1")
        lo, hi = self.rrc_ratio
        if not 0 < lo <= hi:
            bad("rrc_ratio", "give 0 < min <= max, e.g. 0.75,1.3333")
        if self.interpolation not in ("bilinear", "bicubic", "random"):
            bad("interpolation", "choose bilinear, bicubic or random")
        if self.rand_augment and not self.rand_augment.startswith("rand"):
            bad("rand_augment", "give timm's grammar, e.g. rand-m6-mstd0.5-inc1, or an empty value for none")
        r0, r1 = self.progressive_res
        e0, e1 = self.progressive_epochs
        if (r0, r1) != (0, 0) and not (32 <= r0 and 32 <= r1 and 0 <= e0 < e1 <= self.epochs):
            bad("progressive_res", "give two resolutions of at least 32 px and progressive_epochs=start,end "
                "within the run, or 0,0 to turn it off")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


A2 = Recipe(
    name="a2",
    epochs=300,
    train_res=224,
    test_res=224,
    test_crop_pct=0.95,
    global_batch=2048,
    optimizer="lamb",
    lr=5e-3,
    weight_decay=0.02,
    warmup_epochs=5,
    schedule="cosine",
    loss="bce",
    bce_target_thresh=0.2,
    label_smoothing=0.0,
    drop_path_rate=0.05,
    aug_repeats=3,
    rand_augment="rand-m7-mstd0.5-inc1",
    mixup_alpha=0.1,
    cutmix_alpha=1.0,
    paper_top1=79.8,
)

A1 = dataclasses.replace(
    A2,
    name="a1",
    epochs=600,
    weight_decay=0.01,
    label_smoothing=0.1,
    mixup_alpha=0.2,
    paper_top1=80.4,
)

A3 = dataclasses.replace(
    A2,
    name="a3",
    epochs=100,
    train_res=160,
    lr=8e-3,
    drop_path_rate=0.0,
    aug_repeats=0,
    rand_augment="rand-m6-mstd0.5-inc1",
    paper_top1=78.1,
)

RECIPES = {"a1": A1, "a2": A2, "a3": A3}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name.lower()]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def _parse_value(key: str, text: str, annotation) -> object:
    if isinstance(annotation, str):
        annotation = eval(annotation, {"tuple": tuple})  # annotations are strings (PEP 563)
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is tuple:
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            item_types = typing.get_args(annotation)
            if len(parts) != len(item_types):
                raise ValueError
            return tuple(t(p.strip()) for t, p in zip(item_types, parts))
        if annotation is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        return annotation(text)
    except ValueError:
        raise RecipeError(f"recipe key {key!r} expects {getattr(annotation, '__name__', annotation)}, got {text!r}") from None


def override(recipe: Recipe, overrides: list[str] | dict) -> Recipe:
    """Apply `key=value` overrides (strings, as typed on a command line) or a dict of typed values."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise RecipeError(f"override {item!r} is not key=value (e.g. epochs=10)")
            key, text = item.split("=", 1)
            items.append((key.strip(), text.strip()))
    changes = {}
    for key, value in items:
        if key not in fields:
            raise RecipeError(f"unknown recipe key {key!r}; known keys: {', '.join(fields)}")
        if isinstance(value, str) and fields[key].type not in (str, "str"):
            value = _parse_value(key, value, fields[key].type)
        changes[key] = value
    return dataclasses.replace(recipe, **changes).validate()
