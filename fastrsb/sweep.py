"""`fastrsb sweep`: the same recipe with several seeds, summarised like the RSB paper's seed study.

The paper trained A2 with seeds 1..100 (ResNet-50, ImageNet) and reports 79.5-80.0 top-1: the spread
a single run's number carries. Each seed runs `fastrsb train` in its own process, into OUT/seed-N,
one after another, or one per GPU at once (`--parallel per-gpu`, each process pinned with
CUDA_VISIBLE_DEVICES). A seed whose run already finished (its run.json has a finished summary) is not
run again, so an interrupted sweep resumes. OUT/sweep.json holds every run's summary and the
mean, std (sample, ddof=1), min and max of the final top-1 and top-5.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .errors import FastRSBError
from .lock import OutputLock
from .preempt import PREEMPTED_EXIT, Preempted, forward_stop_signals


def parse_seeds(text: str) -> list[int]:
    """'1-5' -> [1..5]; '1,3,7' -> [1, 3, 7]; '4' -> [4]; ranges and lists mix: '1-3,10'."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo or lo < 0:
                    raise ValueError
                seeds += range(lo, hi + 1)
            elif part:
                seeds.append(int(part))
                if seeds[-1] < 0:
                    raise ValueError
    except ValueError:
        raise FastRSBError(f"--seeds {text!r}: give a range like 1-5, a list like 1,3,7, or both") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FastRSBError(f"--seeds {text!r}: give distinct seeds")
    return seeds


def seed_stats(summaries: list[dict], metrics=("top1", "top5")) -> dict:
    """mean, std (ddof=1; 0 for one run), min and max of each metric over the finished runs."""
    stats = {}
    for metric in metrics:
        values = [float(s[metric]) for s in summaries if s.get(metric) is not None]
        if not values:
            continue
        stats[metric] = {
            "n": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return stats


def _finished_summary(run_dir: Path) -> dict | None:
    info = run_dir / "run.json"
    if not info.exists():
        return None
    summary = json.loads(info.read_text()).get("summary")
    return summary if summary and summary.get("finished") else None


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def sweep(recipe: str, seeds: list[int], data: str, out: str | os.PathLike, *, loader: str = "auto",
          model: str | None = None, overrides: list[str] = (), train_args: list[str] = (),
          parallel: str = "auto", log=print) -> dict:
    """Run every seed not yet finished (module docstring); returns sweep.json's content. OUT is held
    for the whole sweep (fastrsb/lock.py). SIGTERM or SIGUSR1 reaches the runs in progress, which
    checkpoint and stop (fastrsb/preempt.py); no new seed starts, and the sweep raises `Preempted`:
    the same command resumes it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out, "sweep"), forward_stop_signals() as stop:
        return _sweep(recipe, seeds, data, out, loader=loader, model=model, overrides=overrides,
                      train_args=train_args, parallel=parallel, log=log, stop=stop)


def _sweep(recipe, seeds, data, out: Path, *, loader, model, overrides, train_args, parallel, log, stop) -> dict:
    gpus = _gpu_count()
    if parallel == "auto":
        parallel = "per-gpu" if gpus > 1 else "sequential"
    if parallel not in ("sequential", "per-gpu"):
        raise FastRSBError(f"--parallel {parallel!r}: choose sequential, per-gpu or auto")
    if parallel == "per-gpu" and gpus < 1:
        raise FastRSBError("--parallel per-gpu needs CUDA GPUs; none is visible (use --parallel sequential)")

    def command(seed: int) -> list[str]:
        cmd = [sys.executable, "-m", "fastrsb", "train", "--recipe", recipe, "--data", str(data),
               "--loader", loader, "--out", str(out / f"seed-{seed}"), "--seed", str(seed), "--no-progress"]
        if model:
            cmd += ["--model", model]
        return cmd + list(train_args) + list(overrides)

    todo = [s for s in seeds if _finished_summary(out / f"seed-{s}") is None]
    if len(todo) < len(seeds):
        log(f"sweep: {len(seeds) - len(todo)} of {len(seeds)} seeds already finished in {out}")
    slots = max(1, gpus) if parallel == "per-gpu" else 1
    running: dict[int, tuple[subprocess.Popen, int, object]] = {}
    failed = []
    queue = list(todo)
    preempted = []
    while queue or running:
        while queue and len(running) < slots and not stop.received:
            seed = queue.pop(0)
            slot = next(i for i in range(slots) if i not in {v[1] for v in running.values()})
            env = dict(os.environ)
            if parallel == "per-gpu":
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            run_dir = out / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(run_dir / "train.out", "a")
            if (run_dir / "checkpoint.pt").exists():
                cmd = command(seed) + ["--resume"]
            else:
                cmd = command(seed)
            log(f"sweep: seed {seed}" + (f" on GPU {slot}" if parallel == "per-gpu" else "") + f": {' '.join(cmd[2:])}")
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            stop.children.append(proc)
            running[seed] = (proc, slot, log_file)
        if stop.received and queue:
            log(f"sweep: {stop.received}: the running seeds checkpoint and stop; seeds {queue} are not started")
            queue.clear()
        time.sleep(0.5)
        for seed, (proc, _, log_file) in list(running.items()):
            if proc.poll() is not None:
                log_file.close()
                del running[seed]
                stop.children.remove(proc)
                if proc.returncode == PREEMPTED_EXIT:
                    preempted.append(seed)
                    log(f"sweep: seed {seed} checkpointed and stopped on a signal")
                elif proc.returncode != 0:
                    failed.append(seed)
                    log(f"sweep: seed {seed} failed (exit {proc.returncode}); see {out / f'seed-{seed}' / 'train.out'}")
    runs = {s: _finished_summary(out / f"seed-{s}") for s in seeds}
    result = {
        "recipe": recipe,
        "seeds": seeds,
        "failed": failed,
        "runs": {str(s): r for s, r in runs.items() if r is not None},
        "stats": seed_stats([r for r in runs.values() if r is not None]),
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    for metric, s in result["stats"].items():
        log(f"sweep {recipe}: {metric} over {s['n']} seeds: mean {s['mean']:.2f}, std {s['std']:.2f}, "
            f"min {s['min']:.2f}, max {s['max']:.2f}")
    if failed:
        raise FastRSBError(f"seeds {failed} failed; the others are summarised in {out / 'sweep.json'}")
    if stop.received or preempted:
        raise Preempted(f"stopped by {stop.received or 'a signal to its runs'}: seeds {preempted} checkpointed "
                        f"mid-run; run the same fastrsb sweep again to resume")
    return result
