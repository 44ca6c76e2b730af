"""End to end: `fastrsb demo` (reduced), its result files and report, a seed sweep, and `fastrsb bench`."""
import json
import statistics

import pytest
from PIL import Image

from conftest import run_cli
from fastrsb.benchlog import read_results

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_cli("demo", "--out", out, "--quick", "--device", "cpu")


def test_demo_runs_end_to_end_and_learns(demo_run):
    out, proc = demo_run
    stdout = proc.stdout
    result = json.loads((out / "demo.json").read_text())
    assert result["ok"]
    assert result["top1"] > 2 * result["chance"], result  # 4 classes: clearly above 25%
    assert "| train" in stdout and "| verify" in stdout and "OK" in stdout
    manifest = json.loads((out / "data" / "train" / "manifest.json").read_text())
    assert manifest["num_rejected"] == 2 and manifest["num_non_images"] == 1
    # only what the user needs: timm's baseline leaves out the files the converter rejected (no "Skipped
    # sample" per epoch), and no worker is forked from the threaded process (numba's "Unable to join threads")
    assert "Skipped sample" not in proc.stderr and "Unable to join threads" not in proc.stderr


def test_demo_results_validate_and_report_makes_pngs(demo_run):
    out, _ = demo_run
    rows = read_results([out / "results.jsonl"])  # raises on any line off the schema
    kinds = {r["benchmark"] for r in rows}
    assert kinds == {"convert", "loader"}
    loaders = [r for r in rows if r["benchmark"] == "loader"]
    assert {r["config"]["backend"] for r in loaders} == {"ffcv", "dali", "pil"}
    assert all(r["baseline"]["value"] > 0 and r["ratio"] > 0 for r in loaders)
    # like for like: every loader ratio is a fastrsb loader + the trainer's augmentation (RandAugment included)
    # against timm's loader with RandAugment
    assert all(r["name"].endswith("+ GPU augmentation") and "RandAugment" in r["baseline"]["name"] for r in loaders)
    # both sides at steady state: each figure is the median of its timed windows, the same count on both sides
    for r in loaders:
        windows, base_windows = r["img_per_s_windows"], r["baseline_img_per_s_windows"]
        assert len(windows) == len(base_windows) == r["config"]["windows"] >= 3
        assert r["value"] == pytest.approx(statistics.median(windows), rel=1e-3)
        assert r["baseline"]["value"] == pytest.approx(statistics.median(base_windows), rel=1e-3)
    report = (out / "report" / "report.md").read_text()
    assert "| loader | ffcv train 64 + GPU augmentation |" in report and "| run | a3 | resnet10t | 4 |" in report
    for png in ("throughput_loader.png", "training_curves.png"):
        with Image.open(out / "report" / png) as im:
            assert im.format == "PNG"


def test_sweep_aggregates_seeds(demo_run, tmp_path):
    out, _ = demo_run
    sweep_dir = tmp_path / "sweep"
    run_cli("sweep", "--recipe", "a3", "--seeds", "1-2", "--data", out / "data", "--loader", "pil",
            "--model", "test_resnet", "--out", sweep_dir, "--device", "cpu", "--batch-per-gpu", "16",
            "epochs=1", "train_res=32", "test_res=32", "global_batch=16", "warmup_epochs=0")
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    top1 = [json.loads((sweep_dir / f"seed-{s}" / "run.json").read_text())["summary"]["top1"] for s in (1, 2)]
    assert sweep["seeds"] == [1, 2] and sweep["failed"] == []
    assert sweep["stats"]["top1"]["mean"] == pytest.approx(statistics.fmean(top1))
    assert sweep["stats"]["top1"]["std"] == pytest.approx(statistics.stdev(top1))
    assert (sweep["stats"]["top1"]["min"], sweep["stats"]["top1"]["max"]) == (min(top1), max(top1))
    runs = [json.loads((sweep_dir / f"seed-{s}" / "run.json").read_text()) for s in (1, 2)]
    assert runs[0]["seed"] != runs[1]["seed"]
    # a finished sweep is not run again
    again = run_cli("sweep", "--recipe", "a3", "--seeds", "1-2", "--data", out / "data", "--loader", "pil",
                    "--model", "test_resnet", "--out", sweep_dir, "--device", "cpu", "--batch-per-gpu", "16",
                    "epochs=1", "train_res=32", "test_res=32", "global_batch=16", "warmup_epochs=0")
    assert "2 of 2 seeds already finished" in again.stdout


def test_bench_e2e_names_the_bound(demo_run, tmp_path):
    out, _ = demo_run
    results = tmp_path / "e2e.jsonl"
    proc = run_cli("bench", "e2e", "--data", out / "data", "--device", "cpu", "--model", "test_resnet",
                   "--res", "32", "--batch", "8", "--steps", "2", "--backend", "pil", "--out", results)
    rows = read_results([results])
    names = [r["name"] for r in rows]
    assert any(n.startswith("end to end") for n in names) and any(n.startswith("bound") for n in names)
    bound = next(r for r in rows if r["name"].startswith("bound"))
    assert bound["bound_by"] in ("loader", "step", "overlap") and bound["advice"] in proc.stdout
    e2e = next(r for r in rows if r["name"].startswith("end to end"))
    assert e2e["baseline"]["value"] > 0  # timm's pipeline over the source folder, same run
    assert all(r["config"]["precision"] == "fp32" for r in rows)  # the trainer's auto on the CPU


def test_bench_step_cli_fp16(tmp_path):
    """The trainer's precision on both sides: fp16 autocast with a GradScaler in fastrsb's step and timm's."""
    results = tmp_path / "step.jsonl"
    run_cli("bench", "step", "--quick", "--device", "cpu", "--res", "32", "--batch", "16", "--precision", "fp16",
            "--out", results)
    rows = read_results([results])
    assert len(rows) == 1 and rows[0]["config"]["precision"] == "fp16"
    assert rows[0]["value"] > 0 and rows[0]["baseline"]["value"] > 0
    # ours is written before timm's baseline is measured (a time limit keeps it), then again with the baseline
    raw = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r.get("provisional", False) for r in raw] == [True, False] and "baseline" not in raw[0]
    assert raw[0]["value"] == raw[1]["value"] and raw[0]["name"] == raw[1]["name"]


def test_bench_aug_cli(tmp_path):
    results = tmp_path / "aug.jsonl"
    run_cli("bench", "aug", "--device", "cpu", "--batches", "8", "--res", "32", "--quick", "--no-compile",
            "--out", results)
    rows = read_results([results])
    moved, timed = rows
    assert timed["ratio"] > 0 and timed["name"].endswith("eager")
    # the eager device part's traffic: bytes per image, kernels, and the H100 floor they imply
    assert moved["name"] == "fastrsb augment traffic, eager device part" and moved["unit"] == "MiB/image"
    assert 0 < moved["value"] < 100 and moved["kernels"] > 10
    floor = moved["h100_floor_ms_per_256_images"]
    assert floor["bytes_ms"] == pytest.approx(moved["value"] * 2**20 * 256 / 3.35e12 * 1e3, rel=0.02)
    assert floor["launch_ms"] == pytest.approx(moved["kernels"] * 5e-3 * 256 / 8, rel=1e-3)


BROKEN_DALI = """
import sys
import nvidia.dali.pipeline

def build(self, *args, **kwargs):  # as a missing libnvjpeg or a CUDA mismatch makes it fail
    raise RuntimeError("libnvjpeg.so.12: cannot open shared object file")

nvidia.dali.pipeline.Pipeline.build = build
from fastrsb.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dali_that_cannot_build_is_skipped_by_name(demo_run, tmp_path):
    """DALI imports but its pipelines cannot build: the preflight and the benches that take backends name
    it as skipped with the reason, exit 0, and measure the others."""
    pytest.importorskip("nvidia.dali")
    import subprocess
    import sys

    from conftest import REPO

    out, _ = demo_run
    data, results = out / "data", tmp_path / "r.jsonl"

    def run(*args):
        proc = subprocess.run([sys.executable, "-c", BROKEN_DALI, *map(str, args), "--out", str(results)],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr[-3000:]
        return proc.stdout

    env_file = tmp_path / "preflight.env"
    stdout = run("bench", "preflight", "--device", "cpu", "--env-file", env_file)
    assert "# preflight dali: FAILED" in stdout and "libnvjpeg" in stdout
    assert env_file.read_text().split() == ["preflight_dali=failed", "preflight_augment=ok", "preflight_step=ok"]
    stdout = run("bench", "loader", "--data", data, "--src", out / "src", "--backends", "pil,dali", "--splits",
                 "train", "--sizes", "32", "--batch-size", "8", "--warmup", "1", "--batches", "2", "--runs", "1",
                 "--device", "cpu")
    assert "# dali: skipped, failed: RuntimeError: libnvjpeg.so.12" in stdout
    stdout = run("bench", "parity", data, "--backends", "dali,ffcv,pil", "--splits", "train", "--res", "32",
                 "--batch-size", "8", "--batches", "1", "--draws", "100", "--device", "cpu")
    assert "# dali: skipped, failed: RuntimeError: libnvjpeg.so.12" in stdout
    stdout = run("bench", "e2e", "--data", data, "--backend", "dali,pil", "--device", "cpu", "--model",
                 "test_resnet", "--res", "32", "--batch", "8", "--steps", "1", "--no-baseline")
    assert "# dali: skipped, failed: RuntimeError: libnvjpeg.so.12" in stdout and "trying pil" in stdout
    rows = read_results([results])
    assert {r["config"]["backend"] for r in rows if r["benchmark"] == "loader"} == {"pil", "timm"}
    parity = {(r["config"]["backend"], r["name"].rsplit(" vs ", 1)[-1]) for r in rows
              if r["benchmark"] == "parity" and "backend" in r["config"]}
    assert parity == {("ffcv", "pil"), ("ffcv", "timm"), ("pil", "timm")}  # no dali; PIL itself against timm
    assert {r["config"]["backend"] for r in rows if r["benchmark"] == "e2e"} == {"pil"}
    assert [r["value"] for r in rows if r["benchmark"] == "preflight"] == [0.0, 1.0, 1.0]
