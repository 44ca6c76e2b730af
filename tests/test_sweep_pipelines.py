"""`fastrsb sweep --pipelines`: every pipeline trains on real data (scikit-learn's UCI digits), the timm
reference is timm's own code path, Welch's interval is right on hand-computed inputs, and the sweep resumes.
Mechanics only: no accuracy figure is checked."""
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from fastrsb.recipes import A3, override
from fastrsb.sweep import pipeline_stats, t_quantile, welch_interval

PIPELINES = ["dali", "ffcv", "pil", "timm"]
TINY = ["epochs=1", "train_res=32", "test_res=32", "global_batch=8", "warmup_epochs=0", "lr=0.256"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Digits 0 and 1 of scikit-learn's UCI digits: 12 train and 4 val images each, 32 px JPEGs, converted."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for label in (0, 1):
        ids = np.flatnonzero(d.target == label)[:16]
        for k, i in enumerate(ids):
            folder = root / "src" / ("train" if k < 12 else "val") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray(np.round(d.images[i] * (255 / 16)).astype(np.uint8), mode="L")
            grey.resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
    run_cli("convert", root / "src", root / "data", "--workers", 1, "--no-progress")
    return root


# ------------------------------------------------------------------ statistics on known inputs

@pytest.mark.parametrize("p, df, table", [(0.975, 1, 12.706), (0.975, 4, 2.776), (0.975, 8, 2.306),
                                          (0.975, 30, 2.042), (0.95, 10, 1.812), (0.995, 5, 4.032)])
def test_t_quantile_matches_the_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-table, abs=5e-4)


def test_welch_interval_by_hand():
    # equal variances (2.5) and sizes (5): se = sqrt(0.5 + 0.5) = 1, df = 1 / (2 * 0.25 / 4) = 8
    w = welch_interval([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])
    assert (w["diff"], w["se"], w["df"]) == (pytest.approx(-2), pytest.approx(1), pytest.approx(8))
    assert (w["low"], w["high"]) == (pytest.approx(-2 - 2.306, abs=1e-3), pytest.approx(-2 + 2.306, abs=1e-3))
    assert w["holds_zero"]
    # variances 1 and 1, n 3 and 3: se = sqrt(2/3), df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4, t = 2.776
    w = welch_interval([10, 11, 12], [1, 2, 3])
    se = math.sqrt(2 / 3)
    assert (w["diff"], w["df"]) == (pytest.approx(9), pytest.approx(4))
    assert (w["low"], w["high"]) == (pytest.approx(9 - 2.776 * se, abs=1e-3), pytest.approx(9 + 2.776 * se, abs=1e-3))
    assert not w["holds_zero"]
    # unequal: s1^2/n1 = 4/3, s2^2/n2 = 2.5/5; df = (11/6)^2 / ((4/3)^2 / 2 + 0.5^2 / 4) = 3.5328...
    w = welch_interval([10, 12, 14], [20, 21, 22, 23, 24])
    assert w["se"] == pytest.approx(math.sqrt(11 / 6))
    assert w["df"] == pytest.approx((11 / 6) ** 2 / ((4 / 3) ** 2 / 2 + 0.25 / 4))
    assert 2.776 < w["t"] < 3.182  # between t(0.975, 4) and t(0.975, 3)
    assert welch_interval([1.0], [1.0, 2.0]) is None


def test_pipeline_stats_against_the_reference():
    runs = {"timm": {1: {"top1": 90.0, "top5": 99.0, "img_per_s": 10.0}, 2: {"top1": 92.0, "top5": 99.0,
                                                                              "img_per_s": 12.0}},
            "pil": {1: {"top1": 80.0, "top5": 98.0, "img_per_s": 30.0}, 2: {"top1": 84.0, "top5": 99.0,
                                                                             "img_per_s": 34.0}, 3: None}}
    per, versus = pipeline_stats(runs)
    assert per["pil"]["stats"]["top1"]["n"] == 2 and per["pil"]["stats"]["img_per_s"]["mean"] == 32.0
    assert per["timm"]["stats"]["top1"]["std"] == pytest.approx(math.sqrt(2))
    assert set(versus) == {"pil"} and versus["pil"]["top1"] == welch_interval([80.0, 84.0], [90.0, 92.0])


# ------------------------------------------------------------------ the reference is timm's code path

def _first_batch_timm(recipe, data):
    from fastrsb.timm_reference import make_mixup, make_timm_loader, train_batches

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    loader, classes = make_timm_loader(recipe, data, batch_size=8, device=torch.device("cpu"), num_workers=0)
    return next(train_batches(loader, make_mixup(recipe, len(classes)), torch.device("cpu")))


def _first_batch_fastrsb(recipe, data):
    from fastrsb.augment import make_train_augment, recipe_augment_kwargs
    from fastrsb.loaders import make_loader

    loader = make_loader("pil", data, "train", batch_size=8, res=recipe.train_res, device="cpu", seed=0,
                         num_workers=0, verbose=False)
    images, labels = next(iter(loader))
    augment = make_train_augment(num_classes=2, **recipe_augment_kwargs(recipe))
    return augment(images, labels, torch.Generator().manual_seed(0))


def test_patching_timms_randaugment_changes_the_reference_and_not_fastrsb(digits, monkeypatch):
    from timm.data.auto_augment import RandAugment

    recipe = override(A3, TINY)
    data = digits / "data"
    timm_x, timm_t = _first_batch_timm(recipe, data)
    assert torch.equal(_first_batch_timm(recipe, data)[0], timm_x)  # seeded: the same batch again
    ours_x, ours_t = _first_batch_fastrsb(recipe, data)

    calls = []

    def black(self, img):
        calls.append(1)
        return Image.new(img.mode, img.size)

    monkeypatch.setattr(RandAugment, "__call__", black)
    patched_x, _ = _first_batch_timm(recipe, data)
    assert calls, "timm's RandAugment was not called by the reference's loader"
    assert not torch.allclose(patched_x, timm_x)
    calls.clear()
    ours_patched_x, ours_patched_t = _first_batch_fastrsb(recipe, data)
    assert not calls
    assert torch.equal(ours_patched_x, ours_x) and torch.equal(ours_patched_t, ours_t)


# ------------------------------------------------------------------ every pipeline, one sweep, resumed

def test_sweep_runs_every_pipeline_and_resumes(digits, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--recipe", "a3", "--pipelines", ",".join(PIPELINES), "--seeds", "1", "--data",
            digits / "data", "--model", "test_resnet", "--out", out, "--device", "cpu", "--batch-per-gpu", "8", *TINY]
    first = run_cli(*args)
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["pipelines"] == PIPELINES and sweep["reference"] == "timm" and sweep["failed"] == []
    for pipeline in PIPELINES:
        run = json.loads((out / pipeline / "seed-1" / "run.json").read_text())
        assert run["loader_backend"] == pipeline and run["summary"]["finished"]
        assert sweep["per_pipeline"][pipeline]["runs"]["1"] == run["summary"]
        assert sweep["per_pipeline"][pipeline]["stats"]["top1"]["n"] == 1
    assert set(sweep["vs_reference"]) == {"dali", "ffcv", "pil"}  # one seed each: no interval yet
    assert all(v["top1"] is None for v in sweep["vs_reference"].values())

    # the reference's run folder reads as a fastrsb one: the same record kinds and keys, the same eval
    def records(pipeline):
        lines = (out / pipeline / "seed-1" / "log.jsonl").read_text().splitlines()
        return {r["kind"]: set(r) for r in map(json.loads, lines)}

    assert records("timm") == records("pil")
    run = json.loads((out / "timm" / "seed-1" / "run.json").read_text())
    assert run["train_source"] == str((digits / "src" / "train").resolve())
    from fastrsb.evaluate import evaluate

    scored = evaluate(out / "timm" / "seed-1", digits / "data", "pil", device="cpu", num_workers=0)
    assert scored["top1"] == run["summary"]["top1"] and scored["samples"] == 8

    # resumed: nothing finished runs again; a missing run does
    shutil.rmtree(out / "dali" / "seed-1")
    stamps = {p: (out / p / "seed-1" / "train.out").stat().st_mtime_ns for p in PIPELINES if p != "dali"}
    again = run_cli(*args)
    assert "3 of 4 runs already finished" in again.stdout
    assert "dali seed 1:" in again.stdout and "timm seed 1:" not in again.stdout
    assert stamps == {p: (out / p / "seed-1" / "train.out").stat().st_mtime_ns for p in stamps}
    assert json.loads((out / "dali" / "seed-1" / "run.json").read_text())["summary"]["finished"]
    assert "timm seed 1:" in first.stdout

    from fastrsb.report import report

    text = report([out], tmp_path / "report").read_text()
    for pipeline in PIPELINES:
        assert f"| {pipeline} | 1 |" in text
        assert f"| {pipeline}/seed-1 | a3 | test_resnet | 1 |" in text  # the runs' table names them apart
    assert (tmp_path / "report" / "sweep_top1_by_pipeline_a3.png").stat().st_size > 1000


def test_reference_refuses_what_it_cannot_run(digits, tmp_path):
    proc = run_cli("train", "--loader", "timm", "--recipe", "a2", "--data", digits / "data", "--model", "test_resnet",
                   "--out", tmp_path / "run", "--device", "cpu", check=False)
    assert proc.returncode == 2 and "aug_repeats=0" in proc.stderr and "Traceback" not in proc.stderr
