"""Loader backends register themselves here; the contract (`fastrsb.loaders.make_loader`, `auto`) reads
the registry and never branches on a backend's name.

A backend module calls `register(Backend(...))` at its top, before it imports its own package (ffcv,
nvidia.dali), so a backend whose package is missing or broken is still known and can say which extra
to install. `BACKEND_MODULES` lists the modules to import to discover them.
"""
from __future__ import annotations

import importlib
import threading
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
    """Import the backend modules once, in a thread of their own.

    Importing ffcv compiles numba functions, and numba keeps its typing failures, tracebacks included, for
    the life of the process; every frame of such a traceback holds its caller (f_back), so an import
    made under make_loader (under a test, under train()) would pin those callers' locals (the first
    loader, its worker processes, a model) until exit. A thread's stack ends at the thread, so what
    numba keeps holds nothing of the caller's."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    failure: list[BaseException] = []
    try:  # numba's worker pool starts in this (main) thread, not in the import thread: forking stays safe
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()
    except Exception:  # no numba, or another numba: the imports below start the pool as before
        pass

    def import_all() -> None:
        try:
            for module in BACKEND_MODULES:
                before = set(_REGISTRY)
                try:
                    importlib.import_module(module)
                except (ImportError, FastRSBError, OSError) as e:  # e.g. ffcv built against a missing libturbojpeg
                    for name in set(_REGISTRY) - before:
                        _BROKEN[name] = str(e)
        except BaseException as e:  # anything else: raised again in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=import_all, name="fastrsb-backend-import")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


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
