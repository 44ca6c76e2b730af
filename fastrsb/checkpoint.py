"""Checkpoints and the files a run leaves: what is saved, how it is read back, and when a resume is allowed.

A checkpoint (`checkpoint.pt`, written atomically at every epoch's end, and mid-epoch on SIGTERM/SIGUSR1
or every --checkpoint-every-steps) holds the model, EMA, optimizer, GradScaler, the optimizer step and
where in the schedule it falls: at an epoch's end `epoch` is the epochs done and `epoch_step` 0; mid-epoch
`epoch` is the epoch in progress (0-based), `epoch_step` the optimizer steps of it done, `steps_per_epoch`
the epoch's length, and `epoch_loss`, `interval_loss`, `interval_steps`, `epoch_train_s` its running sums
(so its records come out as an uninterrupted run's). Also every RNG state (one per process: their count is the run's world size) and
the resolved recipe, as tensors, lists and numbers only, so `torch.load(weights_only=True)` reads it: no
pickled code is ever loaded.

At a run's end the final weights are also written in timm's hub format (`save_hub_files`): `model.safetensors`
and `config.json` (timm.models.save_for_hf), so `timm.create_model("local-dir:RUN", pretrained=True)` builds
the model with the run's eval preprocessing, and the two files upload to the Hugging Face hub as they are.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import FastRSBError
from .runmeta import write_atomic
from .runtime import create_model

CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "model.pt"
EMA_WEIGHTS = "model_ema.pt"
HUB_WEIGHTS = "model.safetensors"  # the names timm's save_for_hf writes and its local-dir: / hf-hub: loaders read
HUB_CONFIG = "config.json"
CHECKPOINT_FORMAT = 3
# Format 1 also stored the epoch a second time (under "loader") and the world size; format 2 had no
# mid-epoch checkpoints (no epoch_step: every one is at an epoch's end). Both still resume.
READABLE_FORMATS = (1, 2, CHECKPOINT_FORMAT)


def capture_rng(augment_state: torch.Tensor) -> dict:
    """All RNG states as tensors, lists and numbers, so `torch.load(weights_only=True)` reads them.
    augment_state: the augmentation generator's state at the checkpoint's epoch boundary, which the
    prefetch may already have moved past (`AugmentedBatches.generator_state_at`)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "augment": augment_state,
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


def load_weights_file(path: Path):
    """torch.load(weights_only=True) of `path`, with a message instead of a traceback for a file that is not one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint (IndexError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastRSBError(f"{path} is not a fastrsb checkpoint or a state_dict file that torch can read safely "
                           f"({first[:120]}); pass a run folder, its checkpoint.pt or model.pt") from None


def load_checkpoint(path: Path, recipe_dict: dict, model_name: str) -> dict:
    """A checkpoint to resume from, refusing one made with another recipe or model."""
    ckpt = load_weights_file(path)
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise FastRSBError(f"{path} is not a fastrsb checkpoint (no format); resume from a checkpoint.pt that "
                           f"fastrsb train wrote")
    if ckpt["format"] not in READABLE_FORMATS:
        raise FastRSBError(f"{path} is a fastrsb checkpoint of format {ckpt['format']}, this fastrsb reads formats "
                           f"{', '.join(map(str, READABLE_FORMATS))}; resume it with the fastrsb version that wrote "
                           f"it, or start a new run with another --out")
    saved = ckpt["recipe"]
    changed = sorted(k for k in set(saved) | set(recipe_dict) if saved.get(k) != recipe_dict.get(k))
    if changed:
        raise FastRSBError(f"{path} was trained with a different recipe (keys {', '.join(changed)}); resume with "
                           f"the same recipe and overrides")
    if ckpt["model_name"] != model_name:
        raise FastRSBError(f"{path} holds a {ckpt['model_name']}, not a {model_name}")
    return ckpt


def load_for_eval(source: str | os.PathLike | torch.nn.Module, model_name: str | None = None,
                  num_classes: int | None = None) -> tuple[torch.nn.Module, dict]:
    """A model from a run folder (model.pt + run.json), a checkpoint.pt, or a bare state_dict file, and what
    is known about it (recipe, model_name, num_classes, classes)."""
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
    obj = load_weights_file(path)
    if isinstance(obj, dict) and obj.get("format") in READABLE_FORMATS:
        info = {"recipe": obj["recipe"], "model_name": obj["model_name"], "num_classes": obj["num_classes"],
                "classes": obj.get("classes"), **info}
        state = obj["model"]
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
        if not info and path.parent.joinpath("run.json").is_file():
            info = json.loads(path.parent.joinpath("run.json").read_text())
    else:
        raise FastRSBError(f"{path} holds neither a fastrsb checkpoint nor a state_dict")
    if num_classes is not None and info.get("num_classes") not in (None, num_classes):
        raise FastRSBError(f"--num-classes {num_classes}, but {source} was trained with {info['num_classes']} classes; "
                           "leave --num-classes out")
    model_name = model_name or info.get("model_name")
    num_classes = num_classes or info.get("num_classes")
    if model_name is None or num_classes is None:
        raise FastRSBError(f"{path} does not say which model it holds; pass --model and --num-classes")
    model = create_model(model_name, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FastRSBError(f"{path} does not fit a {model_name} with {num_classes} classes "
                           f"({str(e).splitlines()[0][:160]}); check --model and --num-classes") from None
    return model, info


# What timm's pretrained_cfg says about the weights timm itself released for this architecture (their tag,
# licence, origin, paper, test-time size and crop): not true of a model trained here, so left out.
_RELEASED_WEIGHTS_KEYS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
                          "test_input_size", "test_crop_pct", "test_pool_size")


def save_hub_files(run_dir: str | os.PathLike) -> Path:
    """Write run_dir/model.safetensors and run_dir/config.json: the weights `fastrsb eval RUN` scores
    (`load_for_eval`: model.pt, not the EMA's model_ema.pt), in timm's hub format, with the recipe's eval
    preprocessing (test_res, test_crop_pct; bicubic, centre crop and ImageNet mean/std, as the val loaders
    and fastrsb.augment.normalize) and the class names as label_names. Returns the config's path.

    timm's save_for_hf writes the model's `pretrained_cfg`, so that is set to describe this model: the
    same on every timm 1.0 (recent releases also take the preprocessing as `data_config`, older ones not)."""
    from timm.models import save_for_hf

    from .augment import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    run_dir = Path(run_dir)
    model, info = load_for_eval(run_dir)  # a fresh, contiguous timm module: no DDP/compile prefixes
    recipe = info.get("recipe") or {}
    res = recipe.get("test_res", 224)
    source = model.pretrained_cfg
    cfg = {k: v for k, v in source.items() if k not in _RELEASED_WEIGHTS_KEYS}
    # the val loaders resize the central int(crop_pct * short side) square to res (loaders/loader.py):
    # timm's eval transform "center" (resize the short side to res / crop_pct, crop res x res), bicubic
    cfg.update(input_size=(3, res, res), crop_pct=recipe.get("test_crop_pct", 0.95), crop_mode="center",
               interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               num_classes=model.num_classes)
    if tuple(source.get("input_size", ())) != cfg["input_size"]:
        cfg["pool_size"] = None  # timm's is the feature map's size at its own input size
    model.pretrained_cfg = cfg
    classes = info.get("classes")
    model_config = {"label_names": list(classes)} if classes and len(classes) == model.num_classes else None
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".hub-") as tmp:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True)
        for name in (HUB_WEIGHTS, HUB_CONFIG):  # the config last: its presence means both are whole
            with open(Path(tmp) / name, "rb") as src:
                write_atomic(run_dir / name, lambda f: shutil.copyfileobj(src, f))
    return run_dir / HUB_CONFIG
