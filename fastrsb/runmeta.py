"""Run metadata, one home for each: library versions, git revision, device names, atomic writes.

Every run folder, benchmark line and conversion manifest records where it came from through this module.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Callable

# Distributions whose versions shape a figure or a file (metadata, not __version__: ffcv's is stale).
_DISTRIBUTIONS = ("torch", "torchvision", "timm", "numpy", "ffcv", "nvidia-dali-cuda120", "nvidia-dali-cuda130",
                  "pillow", "opencv-python", "opencv-python-headless")


def git_revision(short: bool = True) -> str:
    """HEAD of the checkout holding this package, '-dirty' with uncommitted changes; 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse"] + (["--short"] if short else []) + ["HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | None = None) -> str:
    import torch

    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores)"


def versions(only: tuple[str, ...] | None = None) -> dict:
    """Installed versions of what results depend on; with torch loaded, also CUDA, cuDNN and the GPUs.

    only: just fastrsb, python and these distributions (missing ones are left out): what a file's bytes
    depend on, the same whatever else the process has imported."""
    from importlib import metadata

    from . import __version__

    out = {"fastrsb": __version__, "python": platform.python_version()}
    if only is not None:
        for dist in only:
            try:
                out[dist] = metadata.version(dist)  # ffcv's own __version__ attribute is stale
            except metadata.PackageNotFoundError:
                continue
        return out
    out["platform"] = platform.platform()
    for dist in _DISTRIBUTIONS:
        module = sys.modules.get(dist)
        if dist in ("torch", "torchvision") and module is not None:
            out[dist] = module.__version__  # the running build, with its CUDA tag (2.14.1+cu130)
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.backends.cudnn.is_available():
            out["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            out.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return out


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file, fsync, then os.replace: a crash never leaves a half-written file.

    data: text, bytes, or a function that writes into the open binary file (`save_atomic`'s torch.save,
    which then streams to disk instead of building the whole checkpoint in memory first)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save of `obj` through write_atomic."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))
