"""`auto`: which backend reads a split fastest here — a short measurement of each candidate, cached.

Without a measurement the registry's prior order stands (each backend's `prior_cuda` / `prior_cpu`): on a
GPU, DALI's mixed decoder (nvJPEG and the hardware JPEG decoder, not yet measured by fastrsb) before CPU
decoding; on the CPU, FFCV > DALI CPU > PIL (benchmarks/results/cpu-2core-2026-11-26.jsonl: FFCV and DALI
tied at 160, FFCV ahead at 224; measured before FFCV's Pillow-style resize and the shared crop plan, so
a guess for today's pipelines). `probe_backends` replaces the prior with a measurement.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fastrsb.errors import FastRSBError

from . import registry

PROBE_CACHE = ".fastrsb-auto-probe.json"


def candidate_backends(data, split, device) -> tuple[list[str], list[str]]:
    """Backends usable here and with data for `split`, in prior order; and why the others are not."""
    import torch

    cuda = torch.device(device).type == "cuda"
    order = sorted(registry.names(), key=lambda n: getattr(registry.get(n), "prior_cuda" if cuda else "prior_cpu"))
    usable, skipped = [], []
    for name in order:
        backend = registry.get(name)
        if not registry.usable(name):
            skipped.append(f"{name}: not installed")
        elif not backend.has_data(Path(data), split):
            skipped.append(f"{name}: no {backend.reads.format(split=split)}")
        else:
            usable.append(name)
    if not usable:
        raise FastRSBError(f"no backend can read {data}/{split}: " + "; ".join(skipped)
                           + f". Run fastrsb convert SRC {data}")
    return usable, skipped


def choose_backend(data, split, device) -> tuple[str, str]:
    """The prior rule without measuring: the first candidate. Returns (backend, reason)."""
    usable, skipped = candidate_backends(data, split, device)
    return usable[0], "first by the prior order" + ("; skipped " + ", ".join(skipped) if skipped else "")


def probe_backends(data, device, *, make_loader, res: int, batch_size: int, num_workers: int, seconds: float = 2.0,
                   max_batches: int = 6, cached_only: bool = False) -> tuple[str, str] | None:
    """Time the train pipeline of every candidate backend on this machine; return (fastest, reason).

    Each probe builds the loader (FFCV JIT-compiles, DALI builds its pipeline), skips one batch, then
    times up to `max_batches` batches or `seconds`. The result is kept in DATA/.fastrsb-auto-probe.json
    per (device, workers, candidates), so later loaders (the val split, the next run) reuse it without
    probing again. cached_only=True returns None instead of probing (DDP: ranks must not race).
    make_loader: the contract's make_loader (passed in: this module sits below it).
    """
    import torch

    from fastrsb.runmeta import device_name

    data = Path(data)
    usable, skipped = candidate_backends(data, "train", device)
    key = f"{device_name(str(device))}|{num_workers} workers|{','.join(sorted(usable))}"
    cache_path = data / PROBE_CACHE
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        rates = cache[key]
        best = max(rates, key=rates.get)
        return best, "probed earlier on this machine: " + ", ".join(f"{b} {r:,.0f} img/s" for b, r in rates.items())
    if cached_only:
        return None
    if len(usable) == 1:
        return usable[0], "the only usable backend" + ("; skipped " + ", ".join(skipped) if skipped else "")
    rates = {}
    for backend in usable:
        loader = make_loader(backend, data, "train", batch_size=batch_size, res=res, device=device,
                             num_workers=num_workers, verbose=False)
        it = iter(loader)
        next(it)
        n, start = 0, time.perf_counter()
        for images, _ in it:
            n += images.shape[0]
            if n >= max_batches * batch_size or time.perf_counter() - start > seconds:
                break
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # sync: end of the probe's timed window
        rates[backend] = n / (time.perf_counter() - start)
        del it, loader
    try:
        cache[key] = rates
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # a read-only dataset: probe again next time
    best = max(rates, key=rates.get)
    return best, "probed the train pipeline here: " + ", ".join(f"{b} {r:,.0f} img/s" for b, r in rates.items()) \
        + ("; skipped " + ", ".join(skipped) if skipped else "")


def resolve_auto(data, split, device, *, make_loader, rank: int, world_size: int, res: int, batch_size: int,
                 num_workers: int, probe: bool) -> tuple[str, str]:
    """(backend, reason) for backend='auto'; under DDP rank 0 measures and every rank takes its choice."""
    import torch

    from . import layout

    if not layout.is_converted(data):  # a source ImageFolder: only a backend that reads folders (PIL) can
        return choose_backend(data, split, device)
    choice = None  # a converted dataset: measure, or reuse a measurement
    ddp = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not ddp or rank == 0:
        choice = probe_backends(data, device, make_loader=make_loader, res=res, batch_size=batch_size,
                                num_workers=num_workers,
                                cached_only=not probe or (world_size > 1 and not ddp))
    if ddp:
        shared = [choice]
        torch.distributed.broadcast_object_list(shared, src=0)
        choice = shared[0]
    return choice or choose_backend(data, split, device)
