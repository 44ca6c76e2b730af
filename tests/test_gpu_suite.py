"""benchmarks/gpu_suite.sh end to end on the CPU, with tiny sizes: every stage's command line runs.

A GPU session gets one try at the suite within minutes of device time, so a misspelt option or a stage
that crashes must show up here first. The sizes are the suite's own environment knobs; the device is
whatever this machine has (the CPU on CI, where the CUDA-marked tests are skipped).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastrsb.recipes import A3

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "BUDGET_S": "900", "CLASSES": "10", "VAL_PER_CLASS": "20", "COPIES": "3",
    "STEP_RES": "64", "STEP_BATCH": "8", "STEP_MODES": "none", "STEP_ARGS": "--model test_resnet",
    "AUG_BATCHES": "8", "AUG_ARGS": "--res 64 --no-compile --repeats 1 --per-image 4",
    "LOADER_BATCH": "16", "LOADER_BATCHES": "3", "LOADER_DEPTHS": "1,2",
    "E2E_BATCH": "16", "E2E_STEPS": "2", "E2E_BASELINE_STEPS": "1", "E2E_ARGS": "--res 64",
    "PARITY_ARGS": "--draws 500 --batches 1 --batch-size 8",
    "TRAIN_ARGS": "--model resnet10t global_batch=16 train_res=64 test_res=64",
}


@pytest.mark.timeout(900)
def test_gpu_suite_runs_every_stage(tmp_path):
    env = {**os.environ, **TINY, "PYTHON": sys.executable, "WORK_DIR": str(tmp_path / "work")}
    env.pop("PYTHONPATH", None)  # the suite puts the checkout first by itself
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "suite"), "40"],
                          env=env, capture_output=True, text=True, timeout=880)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "suite").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + logs
    assert proc.stdout.rstrip().endswith("every stage passed")

    rows = [json.loads(line) for line in (tmp_path / "suite" / "results.jsonl").read_text().splitlines()]
    by_bench: dict[str, list[dict]] = {}
    for row in rows:
        by_bench.setdefault(row["benchmark"], []).append(row)
    assert set(by_bench) == {"step", "aug", "loader", "e2e", "parity"}
    # each throughput figure that has a baseline was measured against it in the same run
    for bench in ("step", "aug", "e2e"):
        assert any(r.get("baseline") and r["baseline"]["value"] > 0 and r["value"] > 0 for r in by_bench[bench]), bench
    # the A3 step (its stochastic depth: none), at the batch asked for
    step = by_bench["step"][0]
    assert step["config"]["drop_path"] == A3.drop_path_rate and step["config"]["batch"] == 8
    # loader + the trainer's augmentation, like for like with timm's loader, for every usable backend
    augmented = [r for r in by_bench["loader"] if r["name"].endswith("+ GPU augmentation")]
    assert augmented and all(r["ratio"] > 0 for r in augmented)
    assert {r["config"]["backend"] for r in augmented} >= {"pil"}
    dali = [r for r in augmented if r["config"]["backend"] == "dali"]  # DALI at each prefetch depth asked for
    assert not dali or sorted(r["config"]["prefetch_depth"] for r in dali) == [1, 2]
    # e2e: the model head is ImageNet's, on the demo data's 10 classes; the bound line names a stage
    e2e = by_bench["e2e"]
    assert all(r["config"]["num_classes"] == 1000 and r["config"]["batch"] == 16 for r in e2e)
    assert any(r.get("bound_by") in ("loader", "step", "overlap") for r in e2e)
    # parity on the suite's device, against the PIL reference
    assert all(r["config"].get("device", "cpu") in ("cpu", "cuda") for r in by_bench["parity"])
    # fastrsb train ran two epochs with eval, and its log reached the report
    log = [json.loads(line) for line in (tmp_path / "suite" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("kind") == "summary"] and (tmp_path / "work" / "run" / "model.pt").is_file()
    # what comes back from a lent machine is RESULTS_DIR: results, logs, the report, the run's log; no bulk
    assert not list((tmp_path / "suite").rglob("*.JPEG")) and not list((tmp_path / "suite").rglob("*.pt"))
    assert "| run | a3 | resnet10t | 2 |" in (tmp_path / "suite" / "report" / "report.md").read_text()
    # the train split holds every copy: 4 distinct images per class, 3 copies each
    manifest = json.loads((tmp_path / "work" / "data" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 120 and manifest["num_rejected"] == 0
