"""What a run leaves for people and tools: TensorBoard events of the log's figures (fastrsb/runlog.py), and
the final weights as model.safetensors + config.json in timm's hub format (fastrsb/checkpoint.py), which
`timm.create_model("local-dir:RUN", pretrained=True)` loads with the run's eval preprocessing."""
from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from fastrsb.augment import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from fastrsb.checkpoint import load_for_eval
from fastrsb.cli import main as fastrsb_main
from fastrsb.evaluate import evaluate
from fastrsb.errors import FastRSBError
from fastrsb.train import train
from test_train import MEMORY, demo_data, tiny_recipe  # noqa: F401 (a fixture)

timm = pytest.importorskip("timm")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEP_TAGS = {"train/loss": "loss", "train/lr": "lr", "train/img_per_s": "img_per_s"}
EPOCH_TAGS = {"epoch/train_loss": "loss", "epoch/img_per_s": "img_per_s", "epoch/res": "res", "eval/top1": "top1",
              "eval/top5": "top5", "eval/ema_top1": "ema_top1", "eval/ema_top5": "ema_top5"}


def _scalars(events_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag as (step, value) pairs, as TensorBoard shows them (with its purges applied)."""
    acc = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log(run, kind):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_run_folder_has_tensorboard_events_and_timm_hub_files(demo_data, tmp_path, capsys):
    """A real A3 run (RandAugment, mixup/cutmix, EMA on) through the command line: the events hold the log's
    figures at their optimizer steps, and timm loads the folder as the model `fastrsb eval` scores, with
    the recipe's eval size and crop (48 px and 0.9 here, not timm's defaults)."""
    run = tmp_path / "run"
    assert fastrsb_main(["train", "--recipe", "a3", "--data", str(demo_data), "--loader", "pil", "--model",
                         "test_resnet", "--out", str(run), "--batch-per-gpu", "16", "--workers", "0", "--no-progress",
                         "--eval-every", "1", "--log-every", "2", "--device", "cpu", "epochs=2", "train_res=32",
                         "test_res=48", "test_crop_pct=0.9", "global_batch=16", "warmup_epochs=0",
                         "ema_decay=0.9"]) == 0
    assert f"tensorboard --logdir {run / 'tensorboard'}" in capsys.readouterr().out

    # --- TensorBoard: each record's figures at its step, the same numbers as log.jsonl
    scalars = _scalars(run / "tensorboard")
    assert set(scalars) == set(STEP_TAGS) | set(EPOCH_TAGS)
    steps, epochs = _log(run, "step"), _log(run, "epoch")
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12, 14] and [r["step"] for r in epochs] == [7, 14]
    for tags, records in ((STEP_TAGS, steps), (EPOCH_TAGS, epochs)):
        for tag, key in tags.items():
            assert scalars[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], tag
    assert [v for _, v in scalars["epoch/res"]] == [32, 32]

    # --- model.safetensors + config.json: the weights of model.pt (which eval uses), not the EMA's
    from safetensors.torch import load_file

    hub = load_file(run / "model.safetensors")
    plain = timm.create_model("test_resnet", num_classes=4).state_dict()
    assert hub.keys() == plain.keys()  # saved from the bare module: no "module." / "_orig_mod." prefixes
    final, ema = torch.load(run / "model.pt", weights_only=True), torch.load(run / "model_ema.pt", weights_only=True)
    assert all(torch.equal(hub[k], final[k]) for k in hub)
    assert not all(torch.equal(hub[k], ema[k]) for k in hub)
    config = json.loads((run / "config.json").read_text())
    classes = json.loads((run / "run.json").read_text())["classes"]
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 4
    assert config["label_names"] == classes and len(classes) == 4
    assert "tag" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]  # timm's own weights'

    # --- timm loads the folder: the model fastrsb eval uses, and the run's eval preprocessing
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    evaluated, _ = load_for_eval(run)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), evaluated.eval()(x))
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 48, 48) and cfg["crop_pct"] == 0.9 and cfg["crop_mode"] == "center"
    assert cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 4 and cfg["label_names"] == classes
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
    data_config = timm.data.resolve_data_config(model=model)  # what a timm user builds the eval transform from
    assert tuple(data_config["input_size"]) == (3, 48, 48) and data_config["crop_pct"] == 0.9
    # and it scores what the run reported, with the preprocessing its config names
    summary = json.loads((run / "run.json").read_text())["summary"]
    scored = evaluate(model, demo_data, "pil", res=data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                      batch_size=16, num_workers=0, device="cpu")
    assert scored["top1"] == pytest.approx(summary["top1"]) and scored["samples"] == 40


def test_resumed_run_hides_the_events_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    """A run killed after logging past its checkpoint (step 7) left events up to step 14; the resumed run's
    writer purges them (purge_step), so each figure has one value per step: the resumed run's."""
    from torch.utils.tensorboard import SummaryWriter

    recipe = tiny_recipe(epochs=2)
    kw = dict(batch_per_gpu=8, eval_every_epochs=1, log_every_steps=1, progress=False, device="cpu", **MEMORY)
    full = tmp_path / "full"
    train(recipe, "unused", "memory", out_dir=full, **kw)
    run = tmp_path / "run"
    train(recipe, "unused", "memory", out_dir=run, stop_after_epochs=1, **kw)
    stale = SummaryWriter(str(run / "tensorboard"))  # what the killed process wrote after the checkpoint
    for step in range(8, 15):
        stale.add_scalar("train/loss", 99.0, step)
    for tag in ("epoch/train_loss", "eval/top1"):
        stale.add_scalar(tag, 99.0, 14)
    stale.close()
    time.sleep(1.1)  # event files sort by their second of creation: the resumed run's comes after
    train(recipe, "unused", "memory", out_dir=run, resume=True, **kw)

    resumed, uninterrupted = _scalars(run / "tensorboard"), _scalars(full / "tensorboard")
    assert set(resumed) == set(uninterrupted)
    for tag, points in resumed.items():
        assert [s for s, _ in points] == [s for s, _ in uninterrupted[tag]], tag  # no step twice, none missing
        assert 99.0 not in [v for _, v in points], tag
    assert [s for s, _ in resumed["train/loss"]] == list(range(1, 15))
    assert resumed["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in _log(run, "step")]


def test_tensorboard_off_or_missing(demo_data, tmp_path, monkeypatch, capsys):
    """--no-tensorboard writes no events; without the package the default writes none either and the
    run goes on, while an explicit --tensorboard stops up front, naming the extra to install."""
    argv = ["train", "--recipe", "a3", "--data", str(demo_data), "--loader", "pil", "--model", "test_resnet",
            "--batch-per-gpu", "16", "--workers", "0", "--no-progress", "--device", "cpu",
            "epochs=1", "train_res=32", "test_res=32", "global_batch=16", "warmup_epochs=0"]
    assert fastrsb_main(argv + ["--out", str(tmp_path / "off"), "--no-tensorboard"]) == 0
    assert not (tmp_path / "off" / "tensorboard").exists() and (tmp_path / "off" / "model.safetensors").is_file()
    assert fastrsb_main(argv + ["--out", str(tmp_path / "both"), "--no-tensorboard", "--tensorboard", "x"]) == 2
    capsys.readouterr()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert fastrsb_main(argv + ["--out", str(tmp_path / "asked"), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert "tensorboard is not installed" in err and "pip install 'fastrsb[tensorboard]'" in err
    assert not (tmp_path / "asked").exists() and not (tmp_path / "tb").exists()  # before anything was written
    with pytest.raises(FastRSBError, match=r"fastrsb\[tensorboard\]"):
        train(tiny_recipe(epochs=1), "unused", "memory", out_dir=tmp_path / "asked", tensorboard=True, **MEMORY)

    summary = train(tiny_recipe(epochs=1), "unused", "memory", out_dir=tmp_path / "default", batch_per_gpu=8,
                    progress=False, device="cpu", **MEMORY)
    assert summary["finished"] and not (tmp_path / "default" / "tensorboard").exists()
