"""`fastrsb sweep`: the same recipe with several seeds, summarised like the RSB paper's seed study.

The paper trained A2 with seeds 1..100 (ResNet-50, ImageNet) and reports 79.5-80.0 top-1: the spread
a single run's number carries. Each seed runs `fastrsb train` in its own process, into OUT/seed-N,
one after another, or one per GPU at once (`--parallel per-gpu`, each process pinned with
CUDA_VISIBLE_DEVICES). A seed whose run already finished (its run.json has a finished summary) is not
run again, so an interrupted sweep resumes. OUT/sweep.json holds every run's summary and the
mean, std (sample, ddof=1), min and max of the final top-1 and top-5.

Across pipelines (`--pipelines dali,ffcv,pil,timm`): every (pipeline, seed) pair runs `fastrsb train
--loader PIPELINE` into OUT/PIPELINE/seed-N, seed by seed (seed 1 of every pipeline first, so an
interrupted sweep leaves the pipelines with equal numbers of runs), resumable in the same way. timm
(fastrsb/timm_reference.py) is the reference: for every other pipeline, sweep.json holds the difference
of its mean from the reference's with Welch's 95% confidence interval (Welch 1947; the
Welch-Satterthwaite degrees of freedom; the Student-t quantile computed here from the regularized
incomplete beta function, as scipy is not a dependency) and whether the interval holds 0, beside each
pipeline's statistics and training throughput (img/s, evaluation excluded) from the same runs.
"""
from __future__ import annotations

import json
import math
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


# ------------------------------------------------------------------------ Welch's interval

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (any positive real) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on `t_cdf`)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def welch_interval(values: list[float], reference: list[float], confidence: float = 0.95) -> dict | None:
    """mean(values) - mean(reference) with Welch's confidence interval (unequal variances): the standard
    error sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite degrees of freedom, Student's t quantile. None when a
    side has fewer than 2 values. Equal values on both sides (standard error 0) give a zero-width interval."""
    n1, n2 = len(values), len(reference)
    if n1 < 2 or n2 < 2:
        return None
    m1, m2 = statistics.fmean(values), statistics.fmean(reference)
    v1, v2 = statistics.variance(values) / n1, statistics.variance(reference) / n2
    diff, se = m1 - m2, math.sqrt(v1 + v2)
    if se == 0.0:
        return {"diff": diff, "se": 0.0, "df": None, "t": None, "low": diff, "high": diff,
                "confidence": confidence, "holds_zero": diff == 0.0}
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    t = t_quantile(0.5 + confidence / 2.0, df)
    low, high = diff - t * se, diff + t * se
    return {"diff": diff, "se": se, "df": df, "t": t, "low": low, "high": high, "confidence": confidence,
            "holds_zero": low <= 0.0 <= high}


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


REFERENCE = "timm"  # the pipeline the others are compared with (fastrsb/timm_reference.py)


def sweep(recipe: str, seeds: list[int], data: str, out: str | os.PathLike, *, loader: str = "auto",
          pipelines: list[str] | None = None, model: str | None = None, overrides: list[str] = (),
          train_args: list[str] = (), parallel: str = "auto", log=print) -> dict:
    """Run every seed (of every pipeline, with `pipelines`) not yet finished (module docstring); returns
    sweep.json's content. OUT is held for the whole sweep (fastrsb/lock.py). SIGTERM or SIGUSR1 reaches
    the runs in progress, which checkpoint and stop (fastrsb/preempt.py); no new seed starts, and the
    sweep raises `Preempted`: the same command resumes it."""
    if pipelines is not None and (not pipelines or len(set(pipelines)) != len(pipelines)):
        raise FastRSBError(f"--pipelines {','.join(pipelines)!r}: give distinct loaders, e.g. dali,ffcv,pil,timm")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out, "sweep"), forward_stop_signals() as stop:
        return _sweep(recipe, seeds, data, out, loader=loader, pipelines=pipelines, model=model, overrides=overrides,
                      train_args=train_args, parallel=parallel, log=log, stop=stop)


def _run_dir(out: Path, pipeline: str | None, seed: int) -> Path:
    return (out if pipeline is None else out / pipeline) / f"seed-{seed}"


def _name(pipeline: str | None, seed: int) -> str:
    return f"seed {seed}" if pipeline is None else f"{pipeline} seed {seed}"


def _sweep(recipe, seeds, data, out: Path, *, loader, pipelines, model, overrides, train_args, parallel, log,
           stop) -> dict:
    gpus = _gpu_count()
    if parallel == "auto":
        parallel = "per-gpu" if gpus > 1 else "sequential"
    if parallel not in ("sequential", "per-gpu"):
        raise FastRSBError(f"--parallel {parallel!r}: choose sequential, per-gpu or auto")
    if parallel == "per-gpu" and gpus < 1:
        raise FastRSBError("--parallel per-gpu needs CUDA GPUs; none is visible (use --parallel sequential)")

    def command(pipeline: str | None, seed: int) -> list[str]:
        cmd = [sys.executable, "-m", "fastrsb", "train", "--recipe", recipe, "--data", str(data),
               "--loader", pipeline or loader, "--out", str(_run_dir(out, pipeline, seed)), "--seed", str(seed),
               "--no-progress"]
        if model:
            cmd += ["--model", model]
        return cmd + list(train_args) + list(overrides)

    # seed-major: seed 1 of every pipeline, then seed 2, ... (a sweep cut short stays balanced)
    jobs = [(p, s) for s in seeds for p in (pipelines or [None])]
    todo = [j for j in jobs if _finished_summary(_run_dir(out, *j)) is None]
    if len(todo) < len(jobs):
        log(f"sweep: {len(jobs) - len(todo)} of {len(jobs)} {'runs' if pipelines else 'seeds'} already finished in {out}")
    slots = max(1, gpus) if parallel == "per-gpu" else 1
    running: dict[tuple, tuple[subprocess.Popen, int, object]] = {}
    failed = []
    queue = list(todo)
    preempted = []
    while queue or running:
        while queue and len(running) < slots and not stop.received:
            job = queue.pop(0)
            slot = next(i for i in range(slots) if i not in {v[1] for v in running.values()})
            env = dict(os.environ)
            if parallel == "per-gpu":
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            run_dir = _run_dir(out, *job)
            run_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(run_dir / "train.out", "a")
            if (run_dir / "checkpoint.pt").exists():
                cmd = command(*job) + ["--resume"]
            else:
                cmd = command(*job)
            log(f"sweep: {_name(*job)}" + (f" on GPU {slot}" if parallel == "per-gpu" else "")
                + f": {' '.join(cmd[2:])}")
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            stop.children.append(proc)
            running[job] = (proc, slot, log_file)
        if stop.received and queue:
            log(f"sweep: {stop.received}: the running seeds checkpoint and stop; "
                f"{', '.join(_name(*j) for j in queue)} are not started")
            queue.clear()
        time.sleep(0.5)
        for job, (proc, _, log_file) in list(running.items()):
            if proc.poll() is not None:
                log_file.close()
                del running[job]
                stop.children.remove(proc)
                if proc.returncode == PREEMPTED_EXIT:
                    preempted.append(job)
                    log(f"sweep: {_name(*job)} checkpointed and stopped on a signal")
                elif proc.returncode != 0:
                    failed.append(job)
                    log(f"sweep: {_name(*job)} failed (exit {proc.returncode}); see {_run_dir(out, *job) / 'train.out'}")
    if pipelines is None:
        result = _seed_result(recipe, seeds, out, [s for _, s in failed], log)
    else:
        result = _pipeline_result(recipe, seeds, pipelines, out, [f"{p}/seed-{s}" for p, s in failed], log)

    def named(jobs) -> str:
        return f"seeds {[s for _, s in jobs]}" if pipelines is None else f"runs [{', '.join(_name(*j) for j in jobs)}]"

    if failed:
        raise FastRSBError(f"{named(failed)} failed; the others are summarised in {out / 'sweep.json'}")
    if stop.received or preempted:
        raise Preempted(f"stopped by {stop.received or 'a signal to its runs'}: {named(preempted)} checkpointed "
                        f"mid-run; run the same fastrsb sweep again to resume")
    return result


def _seed_result(recipe, seeds, out: Path, failed, log) -> dict:
    runs = {s: _finished_summary(_run_dir(out, None, s)) for s in seeds}
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
    return result


def pipeline_stats(per_pipeline_runs: dict[str, dict], reference: str = REFERENCE) -> tuple[dict, dict]:
    """({pipeline: {runs, stats (top1, top5, img_per_s)}}, {pipeline: {metric: Welch interval against the
    reference}}) from each pipeline's finished summaries ({seed: summary})."""
    per_pipeline = {}
    for pipeline, runs in per_pipeline_runs.items():
        done = [r for r in runs.values() if r is not None]
        per_pipeline[pipeline] = {"runs": {str(s): r for s, r in runs.items() if r is not None},
                                  "stats": seed_stats(done, metrics=("top1", "top5", "img_per_s"))}
    versus = {}
    if reference in per_pipeline_runs:
        def values(pipeline, metric):
            return [float(r[metric]) for r in per_pipeline[pipeline]["runs"].values() if r.get(metric) is not None]

        for pipeline in per_pipeline:
            if pipeline != reference:
                versus[pipeline] = {metric: welch_interval(values(pipeline, metric), values(reference, metric))
                                    for metric in ("top1", "top5")}
    return per_pipeline, versus


def _pipeline_result(recipe, seeds, pipelines, out: Path, failed, log) -> dict:
    per_pipeline, versus = pipeline_stats(
        {p: {s: _finished_summary(_run_dir(out, p, s)) for s in seeds} for p in pipelines})
    result = {"recipe": recipe, "seeds": seeds, "pipelines": pipelines,
              "reference": REFERENCE if REFERENCE in pipelines else None, "failed": failed,
              "per_pipeline": per_pipeline, "vs_reference": versus}
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    for pipeline, entry in per_pipeline.items():
        for metric, s in entry["stats"].items():
            log(f"sweep {recipe} {pipeline}: {metric} over {s['n']} seeds: mean {s['mean']:.2f}, std {s['std']:.2f}, "
                f"min {s['min']:.2f}, max {s['max']:.2f}")
    for pipeline, metrics in versus.items():
        for metric, w in metrics.items():
            if w is not None:
                log(f"sweep {recipe}: {pipeline} - {REFERENCE} {metric}: {w['diff']:+.2f}, 95% CI "
                    f"[{w['low']:+.2f}, {w['high']:+.2f}]" + (" (holds 0)" if w["holds_zero"] else " (excludes 0)"))
    return result
