"""One JSON-lines result format for every benchmark (`fastrsb bench ...` and `benchmarks/*.py`).

Each line is one measurement::

    {"schema": "fastrsb.bench/1", "benchmark": "loader", "name": "ffcv train 160",
     "time": "2026-11-26T22:40:00Z", "git": "ba5a511", "device": "...", "cpu_cores": 2,
     "versions": {...}, "command": "...", "config": {...},
     "value": 840.0, "unit": "img/s",
     "baseline": {"name": "timm create_loader", "value": 590.0}, "ratio": 1.42}

`ratio` is value / baseline value, both measured in the same run, so it holds on a noisy machine.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = "fastrsb.bench/1"
REQUIRED = {"schema": str, "benchmark": str, "name": str, "time": str, "git": str, "device": str,
            "versions": dict, "command": str, "config": dict, "value": (int, float), "unit": str}


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


def versions() -> dict:
    """Installed versions of what the figures depend on (distribution metadata: ffcv's __version__ is stale)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "numpy", "ffcv", "nvidia-dali-cuda120", "nvidia-dali-cuda130",
                 "pillow", "opencv-python"):
        module = sys.modules.get(dist.replace("-", "_"))
        if dist in ("torch", "torchvision") and module is not None:
            out[dist] = module.__version__  # the running build, with its CUDA tag (2.14.1+cu130)
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


_ENV_CACHE: dict = {}


def record(benchmark: str, name: str, value: float, unit: str = "img/s", config: dict | None = None,
           baseline: tuple[str, float] | None = None, device: str | None = None, **extra) -> dict:
    if "env" not in _ENV_CACHE:
        _ENV_CACHE["env"] = {"git": git_revision(), "versions": versions()}
    rec = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "name": name,
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": _ENV_CACHE["env"]["git"],
        "device": device_name(device),
        "cpu_cores": os.cpu_count(),
        "versions": _ENV_CACHE["env"]["versions"],
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "config": config or {},
        "value": round(float(value), 3),
        "unit": unit,
    }
    if baseline is not None:
        rec["baseline"] = {"name": baseline[0], "value": round(float(baseline[1]), 3)}
        rec["ratio"] = round(float(value) / float(baseline[1]), 3) if baseline[1] else None
    rec.update(extra)
    return rec


def emit(rec: dict, out: str | os.PathLike | None = None, echo: bool = True) -> dict:
    """Print one result line (unless echo=False) and append it to `out`, a .jsonl file, when given."""
    validate(rec)
    line = json.dumps(rec, sort_keys=False)
    if echo:
        print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    return rec


def validate(rec: dict) -> None:
    """Raise ValueError when `rec` is not a result line of this schema."""
    for key, kind in REQUIRED.items():
        if key not in rec:
            raise ValueError(f"benchmark result lacks {key!r}: {rec}")
        if not isinstance(rec[key], kind) or isinstance(rec[key], bool):
            raise ValueError(f"benchmark result field {key!r} has type {type(rec[key]).__name__}")
    if rec["schema"] != SCHEMA:
        raise ValueError(f"unknown schema {rec['schema']!r} (expected {SCHEMA})")
    if "baseline" in rec:
        if not {"name", "value"} <= set(rec["baseline"]) or "ratio" not in rec:
            raise ValueError("a result with a baseline needs baseline.name, baseline.value and ratio")


def read_results(paths) -> list[dict]:
    rows = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip() or not line.lstrip().startswith("{"):
                continue
            rec = json.loads(line)
            try:
                validate(rec)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            rows.append(rec)
    return rows


def time_calls(fn, device=None, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Seconds of each of `repeats` calls of `fn()` after `warmup` untimed calls; CUDA timed with events."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # sync: timing only
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_call(fn, device=None, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call of `fn()` (see time_calls)."""
    return statistics.median(time_calls(fn, device, warmup, repeats))
