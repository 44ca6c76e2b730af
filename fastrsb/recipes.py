"""The ResNet Strikes Back training recipes A1, A2 and A3.

Wightman, Touvron, Jegou, "ResNet strikes back: An improved training procedure in timm",
arXiv 2110.00476, Table 1. The BCE target threshold 0.2 comes from timm's public command lines for
these recipes (`--bce-loss --bce-target-thresh 0.2`), not from the paper's table.

A2 is written out in full; A1 and A3 are `dataclasses.replace` of A2, so every difference from A2
stands on one line. Command-line overrides go through `override`, which rejects unknown keys and
values of the wrong type.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass


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
    dropout: float = 0.0
    grad_clip: float = 0.0  # 0: none (the paper lists none); see fastrsb.optim for LAMB's own clipping
    ema_decay: float = 0.0  # 0: no EMA
    random_erasing: float = 0.0
    color_jitter: float = 0.0
    hflip: float = 0.5
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mixed_precision: bool = True
    model: str = "resnet50"
    # Top-1 the paper reports for ResNet-50 at 224 on ImageNet-val: the target, not a promise.
    paper_top1: float = 0.0

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
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


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
        raise ValueError(f"recipe key {key!r} expects {getattr(annotation, '__name__', annotation)}, got {text!r}") from None


def override(recipe: Recipe, overrides: list[str] | dict) -> Recipe:
    """Apply `key=value` overrides (strings, as typed on a command line) or a dict of typed values."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value (e.g. epochs=10)")
            key, text = item.split("=", 1)
            items.append((key.strip(), text.strip()))
    changes = {}
    for key, value in items:
        if key not in fields:
            raise ValueError(f"unknown recipe key {key!r}; known keys: {', '.join(fields)}")
        if isinstance(value, str) and fields[key].type not in (str, "str"):
            value = _parse_value(key, value, fields[key].type)
        changes[key] = value
    return dataclasses.replace(recipe, **changes)
