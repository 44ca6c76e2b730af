"""benchmarks/gpu_suite.sh end to end on the CPU, with tiny sizes: every stage's command line runs.

A GPU box may be at hand for minutes only, so a misspelt option or a stage that crashes must show up
here first. The sizes are the suite's own environment knobs; the device is
whatever this machine has (the CPU on CI, where the CUDA-marked tests are skipped). The budget is the
suite's default: tiny sizes on two cores fit in it, in the same stage order as on a GPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastrsb.recipes import A3

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
ORDER = ["preflight", "bench-step", "bench-aug", "demo-data", "convert", "bench-loader", "bench-e2e", "bench-parity",
         "train", "tests-cuda"]


def test_gpu_suite_stage_limits_fit_its_default_budget():
    """Every `stage NAME LIMIT` line of the script, in order: headline figures first, and limits that add up
    to no more than the default budget, which is at most 6 minutes."""
    text = SUITE.read_text()
    budget = int(re.search(r"^budget=\$\{BUDGET_S:-(\d+)\}$", text, re.M).group(1))
    stages = [(m.group(1), int(m.group(2))) for m in re.finditer(r"^\s*stage ([\w-]+) (\d+) ", text, re.M)]
    assert [name for name, _ in stages] == ORDER
    assert budget <= 360 and sum(limit for _, limit in stages) <= budget, stages
    assert "report" not in [name for name, _ in stages]  # made afterwards, on any machine
TINY = {
    "CLASSES": "10", "VAL_PER_CLASS": "20", "COPIES": "3",
    "STEP_RES": "64", "STEP_BATCH": "8", "STEP_MODES": "none", "STEP_ARGS": "--model test_resnet",
    "AUG_BATCHES": "8", "AUG_ARGS": "--res 64 --no-compile --repeats 1 --per-image 4",
    "LOADER_BACKENDS": "dali,pil", "LOADER_RES": "64", "LOADER_BATCH": "16", "LOADER_BATCHES": "3", "LOADER_DEPTHS": "1,2",
    "E2E_BATCH": "16", "E2E_STEPS": "2", "E2E_BASELINE_STEPS": "1", "E2E_ARGS": "--res 64",
    "PARITY_ARGS": "--draws 200 --batches 1 --batch-size 8 --splits train",
    "TRAIN_ARGS": "--model resnet10t global_batch=16 train_res=64 test_res=64",
}


@pytest.mark.timeout(900)
def test_gpu_suite_runs_every_stage(tmp_path):
    env = {**os.environ, **TINY, "PYTHON": sys.executable, "WORK_DIR": str(tmp_path / "work")}
    env.pop("PYTHONPATH", None)  # the suite puts the checkout first by itself
    env.pop("BUDGET_S", None)
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path / "suite"), "40"], env=env, capture_output=True,
                          text=True, timeout=880)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "suite").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + logs
    assert proc.stdout.rstrip().endswith("every stage passed")
    ran = re.findall(r"^== ([\w-]+) \(limit \d+s\)$", proc.stdout, re.M)
    assert ran == ORDER, proc.stdout

    rows = [json.loads(line) for line in (tmp_path / "suite" / "results.jsonl").read_text().splitlines()]
    by_bench: dict[str, list[dict]] = {}
    for row in rows:
        by_bench.setdefault(row["benchmark"], []).append(row)
    assert set(by_bench) == {"preflight", "step", "aug", "loader", "e2e", "parity"}
    assert {r["name"]: r["value"] for r in by_bench["preflight"]} == {"dali": 1.0, "augment": 1.0, "step": 1.0}
    assert rows[0]["benchmark"] == "preflight" and rows[-1]["benchmark"] == "parity"  # appended stage by stage
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
    # DALI at each prefetch depth and hardware-decoder share asked for
    dali = [r for r in augmented if r["config"]["backend"] == "dali"]
    assert sorted((r["config"]["prefetch_depth"], r["config"]["hw_decoder_load"]) for r in dali) == \
        [(1, 0.65), (1, 1.0), (2, 0.65), (2, 1.0)]
    # e2e: the model head is ImageNet's, on the demo data's 10 classes; the bound line names a stage
    e2e = by_bench["e2e"]
    assert all(r["config"]["num_classes"] == 1000 and r["config"]["batch"] == 16 for r in e2e)
    assert any(r.get("bound_by") in ("loader", "step", "overlap") for r in e2e)
    # parity on the suite's device, against the PIL reference
    assert all(r["config"].get("device", "cpu") in ("cpu", "cuda") for r in by_bench["parity"])
    # fastrsb train ran two epochs with eval, and its log reached the report
    log = [json.loads(line) for line in (tmp_path / "suite" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("kind") == "summary"] and (tmp_path / "work" / "run" / "model.pt").is_file()
    # RESULTS_DIR holds results, logs and the run's log, no bulk; the report is made from it afterwards
    assert not list((tmp_path / "suite").rglob("*.JPEG")) and not list((tmp_path / "suite").rglob("*.pt"))
    report = re.search(r"^report: (fastrsb report .*)$", proc.stdout, re.M).group(1).split()[2:]
    subprocess.run([sys.executable, "-m", "fastrsb", "report", *report], check=True, capture_output=True,
                   timeout=300, cwd=REPO)
    assert "| run | a3 | resnet10t | 2 |" in (tmp_path / "suite" / "report" / "report.md").read_text()
    # the train split holds every copy: 4 distinct images per class, 3 copies each
    manifest = json.loads((tmp_path / "work" / "data" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 120 and manifest["num_rejected"] == 0
