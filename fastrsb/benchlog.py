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
import shlex
import statistics
import sys
import time
from pathlib import Path

from .runmeta import device_name, git_revision, versions

SCHEMA = "fastrsb.bench/1"
REQUIRED = {"schema": str, "benchmark": str, "name": str, "time": str, "git": str, "device": str,
            "versions": dict, "command": str, "config": dict, "value": (int, float), "unit": str}


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
    return final_only(rows)


def failure(e: BaseException) -> str:
    """A backend's failure (at build, at its first batch or later), in one line: `bench loader`, `parity`
    and `e2e` print it, skip that backend and measure the others."""
    text = str(e).strip()
    return f"failed: {type(e).__name__}{': ' + text.splitlines()[0] if text else ''}"


def final_only(rows: list[dict]) -> list[dict]:
    """Drop each provisional line (one written before its baseline was measured, so that a run cut short
    keeps it) whose final line, with the baseline, came later in the same run."""
    final = {(r["benchmark"], r["name"], r["git"]) for r in rows if not r.get("provisional")}
    return [r for r in rows if not (r.get("provisional") and (r["benchmark"], r["name"], r["git"]) in final)]


class Timer:
    """The one timer: wall-clock seconds of the work issued between `start()` and `stop()`.

    On CUDA both ends synchronise the device (marked `sync:`), so the figure covers every stream's work,
    a side-stream loader's included; on the CPU it is perf_counter.
    """

    def __init__(self, device=None):
        import torch

        self.device = torch.device(device) if device is not None else None
        self.cuda = self.device is not None and self.device.type == "cuda"
        self.t0 = None

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)  # sync: timing only

    def start(self) -> "Timer":
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self.t0


def time_calls(fn, device=None, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Seconds of each of `repeats` calls of `fn()` after `warmup` untimed calls (see Timer)."""
    for _ in range(warmup):
        fn()
    timer = Timer(device)
    times = []
    for _ in range(repeats):
        timer.start()
        fn()
        times.append(timer.stop())
    return times


def time_call(fn, device=None, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call of `fn()` (see time_calls)."""
    return statistics.median(time_calls(fn, device, warmup, repeats))
