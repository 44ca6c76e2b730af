"""Top-1 / top-5 on the val split: after training epochs and as `fastrsb eval`.

RSB evaluates at the test resolution with crop 0.95 (A3: train 160, test 224): the loader resizes the
central int(0.95 * short side) square to 224 with bicubic interpolation.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint import load_for_eval
from .errors import FastRSBError
from .runtime import DistInfo, autocast, resolve_precision, setup_distributed


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, *, device: torch.device, precision: str,
                   normalize: Callable, dist_info: DistInfo | None = None) -> dict:
    """Top-1 / top-5 (%) over `loader`; in DDP the counts are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, samples
    for images, labels in loader:
        x = normalize(images, dtype=torch.float32)
        with autocast(device, precision):
            logits = model(x)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        counts[2] += labels.shape[0]  # a Python number: no host-to-device copy
    if dist_info is not None and dist_info.enabled:
        dist.all_reduce(counts)
    top1_hits, top5_hits, n = counts.tolist()  # sync: once per evaluation
    model.train(was_training)
    if n == 0:
        raise FastRSBError("the validation split yielded no images")
    return {"top1": 100.0 * top1_hits / n, "top5": 100.0 * top5_hits / n, "samples": n}


def check_classes(trained: list[str] | None, num_trained: int | None, loader, data) -> None:
    """Refuse to score a model on data whose classes are not the ones it was trained on."""
    data_classes = getattr(loader, "classes", None)
    if num_trained is not None and loader.num_classes != num_trained:
        raise FastRSBError(f"the model was trained on {num_trained} classes, {data} has {loader.num_classes}: "
                           "evaluate on the dataset it was trained on")
    if trained and data_classes and list(trained) != list(data_classes):
        differ = next(i for i, (a, b) in enumerate(zip(trained, data_classes)) if a != b)
        raise FastRSBError(f"class {differ} of the model is {trained[differ]!r}, of {data} {data_classes[differ]!r}: "
                           "the labels would not match; evaluate on the dataset it was trained on")


def evaluate(model_or_checkpoint, data: str | os.PathLike, backend: str = "auto", *, model_name: str | None = None,
             num_classes: int | None = None, res: int | None = None, crop_pct: float | None = None,
             batch_size: int = 256, device: str | torch.device | None = None, precision: str = "auto",
             num_workers: int | None = None, make_loader: Callable | None = None,
             normalize: Callable | None = None) -> dict:
    """Top-1 / top-5 of a model, run folder or checkpoint on the val split of `data`.

    Resolution and crop default to the run's recipe (test_res, test_crop_pct), else 224 and 0.95.
    """
    if make_loader is None:
        from .loaders import make_loader
    if normalize is None:
        from .augment import normalize
    dist_info = setup_distributed(device)
    try:
        model, info = load_for_eval(model_or_checkpoint, model_name, num_classes)
        recipe = info.get("recipe") or {}
        res = res or recipe.get("test_res", 224)
        crop_pct = crop_pct or recipe.get("test_crop_pct", 0.95)
        precision = resolve_precision(precision, dist_info.device, recipe.get("mixed_precision", True))
        loader = make_loader(backend, data, "val", batch_size=batch_size, res=res, device=dist_info.device,
                             rank=dist_info.rank, world_size=dist_info.world_size, crop_pct=crop_pct,
                             drop_last=False, num_workers=num_workers)
        check_classes(info.get("classes"), info.get("num_classes"), loader, data)
        model.to(device=dist_info.device, memory_format=torch.channels_last)
        result = evaluate_model(model, loader, device=dist_info.device, precision=precision, normalize=normalize,
                                dist_info=dist_info)
        result.update({"res": res, "crop_pct": crop_pct})
        if dist_info.is_main:
            print(json.dumps(result))
        return result
    finally:
        dist_info.close()
