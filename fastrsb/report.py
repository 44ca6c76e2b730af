"""`fastrsb report RESULTS... --out DIR`: benchmark results and training logs to PNG plots and markdown.

Inputs: files or folders. `*.jsonl` lines of the benchmark schema (fastrsb/benchlog.py) become a
throughput plot per benchmark (each figure beside its same-run baseline) and a table; a run folder's
`log.jsonl` (written by `fastrsb train`) becomes training curves (loss per step, top-1 per epoch)
and a row of the run summary table; a sweep's `sweep.json` becomes a seed-statistics table, and a sweep
across pipelines a table of each pipeline against the reference (Welch's interval) and a plot of every
seed's top-1 by pipeline.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from .benchlog import SCHEMA, final_only, validate


def _collect(paths) -> tuple[list[dict], dict[str, list[dict]], list[dict]]:
    bench, runs, sweeps = [], {}, []
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.jsonl")) + sorted(p.rglob("sweep.json"))
        elif p.exists():
            files.append(p)
        else:
            from .errors import FastRSBError

            raise FastRSBError(f"{p}: no such file or folder")
    for f in files:
        if f.name == "sweep.json":
            sweeps.append(json.loads(f.read_text()))
            continue
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip().startswith("{")]
        if any(r.get("schema") == SCHEMA for r in records):
            for r in records:
                if r.get("schema") == SCHEMA:
                    validate(r)
                    bench.append(r)
        elif any(r.get("kind") in ("step", "epoch", "summary") for r in records):
            runs[str(f.parent)] = records
    return final_only(bench), runs, sweeps


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _plot_throughput(bench: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_kind = defaultdict(list)
    for r in bench:
        by_kind[r["benchmark"]].append(r)
    for kind, rows in sorted(by_kind.items()):
        labels = [f"{r['name']}\n{r['device'][:28]}" for r in rows]
        values = [r["value"] for r in rows]
        baselines = [r.get("baseline", {}).get("value") for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 3), 4.5))
        x = range(len(rows))
        width = 0.4
        ax.bar([i - width / 2 for i in x], values, width, label="measured")
        if any(b is not None for b in baselines):
            ax.bar([i + width / 2 for i in x], [b or 0 for b in baselines], width, label="its baseline (same run)",
                   hatch="//", alpha=0.7)
        for i, r in enumerate(rows):
            if r.get("ratio") is not None:
                ax.annotate(f"x{r['ratio']:.2f}", (i - width / 2, values[i]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(rows[0]["unit"])
        ax.set_title(f"{kind} throughput")
        ax.legend()
        fig.tight_layout()
        path = out / f"throughput_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _run_label(run: str, runs) -> str:
    """The run folder's name, or its path below the runs' common folder when names repeat (a sweep's
    PIPELINE/seed-N)."""
    names = [Path(r).name for r in runs]
    if names.count(Path(run).name) == 1:
        return Path(run).name
    return os.path.relpath(run, os.path.commonpath(list(runs)))


def _plot_runs(runs: dict[str, list[dict]], out: Path) -> Path | None:
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run, records in sorted(runs.items()):
        name = _run_label(run, runs)
        steps = [(r["step"], r["loss"]) for r in records if r.get("kind") in ("step",) and r.get("loss") is not None]
        if not steps:
            steps = [(r["step"], r["loss"]) for r in records if r.get("kind") == "epoch"]
        if steps:
            ax_loss.plot(*zip(*steps), label=name)
        acc = [(r["epoch"] + 1, r["top1"]) for r in records if r.get("kind") == "epoch" and r.get("top1") is not None]
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pipeline_seeds(sweep: dict, out: Path) -> Path:
    """Final top-1 of every seed, one column per pipeline, its mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipelines = list(sweep["per_pipeline"])
    fig, ax = plt.subplots(figsize=(1.6 * len(pipelines) + 2.5, 4))
    for i, pipeline in enumerate(pipelines):
        runs = sweep["per_pipeline"][pipeline]["runs"]
        seeds = sorted(runs, key=int)
        values = [runs[s]["top1"] for s in seeds if runs[s].get("top1") is not None]
        if not values:
            continue
        offsets = [(k - (len(values) - 1) / 2) * 0.06 for k in range(len(values))]
        ax.scatter([i + o for o in offsets], values, zorder=3, label=None)
        mean = sum(values) / len(values)
        ax.hlines(mean, i - 0.3, i + 0.3, colors="black", zorder=4)
    ax.set_xticks(range(len(pipelines)))
    ax.set_xticklabels([p + (" (reference)" if p == sweep.get("reference") else "") for p in pipelines])
    ax.set_ylabel("final top-1 (%)")
    ax.set_title(f"{sweep['recipe']}: top-1 per seed (dots) and mean (line), by pipeline")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"sweep_top1_by_pipeline_{sweep['recipe']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pipeline_sweep(sweep: dict, out: Path) -> list[str]:
    """The markdown of a sweep across pipelines (fastrsb/sweep.py): per pipeline its statistics, and
    its difference from the reference with Welch's interval."""
    reference = sweep.get("reference")
    lines = [f"## Pipelines against {reference or 'each other'}: {sweep['recipe']}", "",
             "| pipeline | seeds | top-1 mean | sd | min | max | top-5 mean | sd | img/s (train) "
             "| top-1 minus reference, 95% Welch CI | holds 0 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pipeline, entry in sweep["per_pipeline"].items():
        st = entry["stats"]
        t1, t5, rate = st.get("top1"), st.get("top5"), st.get("img_per_s")
        w = (sweep.get("vs_reference", {}).get(pipeline) or {}).get("top1")
        if pipeline == reference:
            versus, holds = "reference", "-"
        elif w is None:
            versus, holds = "-", "-"
        else:
            versus = f"{w['diff']:+.2f} [{w['low']:+.2f}, {w['high']:+.2f}]"
            holds = "yes" if w["holds_zero"] else "**no**"
        cell = (lambda v, k: f"{v[k]:.2f}" if v else "-")
        lines.append(f"| {pipeline} | {t1['n'] if t1 else 0} | {cell(t1, 'mean')} | {cell(t1, 'std')} | "
                     f"{cell(t1, 'min')} | {cell(t1, 'max')} | {cell(t5, 'mean')} | {cell(t5, 'std')} | "
                     f"{_fmt(rate['mean']) if rate else '-'} | {versus} | {holds} |")
    plot = _plot_pipeline_seeds(sweep, out)
    return lines + ["", f"![top-1 per seed by pipeline]({plot.name})", ""]


def report(paths, out: str | os.PathLike) -> Path:
    """Write plots and report.md into `out`; returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench, runs, sweeps = _collect(paths)
    if not (bench or runs or sweeps):
        from .errors import FastRSBError

        raise FastRSBError("no benchmark results, training logs or sweeps found in " + ", ".join(map(str, paths)))
    lines = ["# fastrsb report", ""]
    if bench:
        plots = _plot_throughput(bench, out)
        lines += ["## Throughput", "", "| benchmark | measurement | device | value | baseline (same run) | ratio | git |",
                  "|---|---|---|---|---|---|---|"]
        for r in bench:
            base = r.get("baseline")
            lines.append(f"| {r['benchmark']} | {r['name']} | {r['device']} | {_fmt(r['value'])} {r['unit']} | "
                         + (f"{base['name']}: {_fmt(base['value'])}" if base else "-")
                         + f" | {_fmt(r.get('ratio'))} | {r['git']} |")
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if runs:
        curves = _plot_runs(runs, out)
        lines += ["## Training runs", "", "| run | recipe | model | epochs | img/s | top-1 | top-5 | time |",
                  "|---|---|---|---|---|---|---|---|"]
        for run, records in sorted(runs.items()):
            summary = next((r for r in reversed(records) if r.get("kind") == "summary"), None)
            if summary is None:
                last = next((r for r in reversed(records) if r.get("kind") == "epoch"), {})
                summary = {"epochs_done": last.get("epoch", -1) + 1, "top1": last.get("top1"), "img_per_s": last.get("img_per_s")}
            lines.append(f"| {_run_label(run, runs)} | {summary.get('recipe', '-')} | {summary.get('model_name', '-')} | "
                         f"{_fmt(summary.get('epochs_done'))} | {_fmt(summary.get('img_per_s'))} | "
                         f"{_fmt(summary.get('top1'))} | {_fmt(summary.get('top5'))} | "
                         f"{_fmt(summary.get('wall_time_s'))} s |")
        lines += ["", f"![training curves]({curves.name})", ""]
    for sweep in sweeps:
        if "per_pipeline" in sweep:
            lines += _pipeline_sweep(sweep, out)
            continue
        s = sweep["stats"]
        lines += [f"## Seed sweep: {sweep['recipe']} ({len(sweep['runs'])} seeds)", "",
                  "| metric | mean | std | min | max |", "|---|---|---|---|---|"]
        for metric, v in s.items():
            lines.append(f"| {metric} | {v['mean']:.2f} | {v['std']:.2f} | {v['min']:.2f} | {v['max']:.2f} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
