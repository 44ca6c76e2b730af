"""Loader backends register themselves here; the contract (`fastrsb.loaders.make_loader`, `auto`) reads
the registry and never branches on a backend's name.

A backend module calls `register(Backend(...))` at its top, before it imports its own package (ffcv,
nvidia.dali), so a backend whose package is missing or broken is still known and can say which extra
to install. `BACKEND_MODULES` lists the modules to import to discover them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastrsb.errors import FastRSBError

BACKEND_MODULES = ("fastrsb.loaders.dali_loader", "fastrsb.loaders.ffcv_loader", "fastrsb.loaders.imagefolder")


@dataclass(frozen=True)
class Backend:
    name: str
    reads: str  # what it needs on disk, for messages: "<split>/<split>.beton"
    convert_format: str  # `fastrsb convert --format X` writes what it reads
    has_data: Callable[[Path, str], bool]  # (data, split) -> whether this backend can read that split
    open: Callable[..., object]  # (data, split, *, batch_size, res, device, num_workers, plan_kwargs, crop,
    #                               options) -> an object with backend, num_samples, classes, device,
    #                               plan and iter_epoch(epoch, res)
    prior_cuda: int  # rank in `auto`'s prior order without a measurement (lower first)
    prior_cpu: int


_REGISTRY: dict[str, Backend] = {}
_BROKEN: dict[str, str] = {}  # name -> why its module did not import (the message names the extra)
_discovered = False


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in BACKEND_MODULES:
        before = set(_REGISTRY)
        try:
            importlib.import_module(module)
        except (ImportError, FastRSBError, OSError) as e:  # e.g. ffcv built against a missing libturbojpeg
            for name in set(_REGISTRY) - before:
                _BROKEN[name] = str(e)


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    _discover()
    if name not in _REGISTRY:
        raise FastRSBError(f"unknown loader backend {name!r}: choose one of {', '.join(sorted(_REGISTRY))} or auto")
    return _REGISTRY[name]


def usable(name: str) -> bool:
    """Whether the backend is known and its package imports here."""
    _discover()
    return name in _REGISTRY and name not in _BROKEN


def why_unusable(name: str) -> str:
    _discover()
    return _BROKEN.get(name, "")
