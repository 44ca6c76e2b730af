"""fastrsb.train on the CPU: learns, resumes bit-identically, DDP (gloo, 2 processes) matches 1 process.

Learning and resuming run the real pipeline: `fastrsb demo-data` -> `fastrsb convert --format beton,dali`
-> the `pil` loader -> fastrsb.augment (RandAugment, mixup/cutmix). The DDP and non-finite-loss tests use
a small in-memory loader and augmentation that honour the same contracts (uint8 NCHW channels-last
images and int64 labels on the device; augment -> normalised float images and dense soft targets),
so that only the trainer is under test.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastrsb.cli import main as fastrsb_main
from fastrsb.errors import FastRSBError
from fastrsb.recipes import A3, override
from fastrsb.evaluate import evaluate
from fastrsb.runtime import plan_batches, prepare_device
from fastrsb.train import train

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


class MemoryLoader:
    """Class-coloured noisy images; order depends only on (seed, epoch); rank r takes every world_size-th."""

    backend = "memory"

    def __init__(self, split, *, batch_size, res, device, rank=0, world_size=1, seed=0, drop_last=True,
                 num_classes=4, per_class=30):
        g = torch.Generator().manual_seed(1234 if split == "train" else 4321)
        self.num_classes = num_classes
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        colours = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(7)) * 200 + 28
        images = colours[labels] + torch.randn(len(labels), 3, res, res, generator=g) * 40
        # a class-specific bright quadrant, so the task needs spatial features too
        half = res // 2
        for c in range(num_classes):
            idx = labels == c
            images[idx, :, (c // 2) * half:(c // 2 + 1) * half, (c % 2) * half:(c % 2 + 1) * half] += 40
        self.images = images.clamp(0, 255).to(torch.uint8)
        self.labels = labels
        self.num_samples = len(labels)
        self.batch_size, self.device, self.rank, self.world_size = batch_size, torch.device(device), rank, world_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, split == "train"
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch, res=None, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self):
        n = self.num_samples
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100 + self.epoch))
                 if self.shuffle else torch.arange(n))
        return order[self.rank::self.world_size]

    def __len__(self):
        per_rank = self.num_samples // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        for b in range(self.start_batch, len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield (self.images[sel].to(self.device).contiguous(memory_format=torch.channels_last),
                   self.labels[sel].to(self.device))


def make_memory_loader(backend, data, split, **kwargs):
    for unused in ("aug_repeats", "crop_pct", "num_workers", "scale", "ratio", "hflip", "interpolation",
                   "accum_steps"):
        kwargs.pop(unused, None)
    return MemoryLoader(split, **kwargs)


def memory_normalize(images, dtype=torch.float32):
    return ((images.float() - MEAN.to(images.device)) / STD.to(images.device)).to(dtype)


def make_memory_augment(rand_augment, mixup_alpha, cutmix_alpha, label_smoothing, num_classes,
                        mixup_prob=1.0, switch_prob=0.5, dtype=torch.float32, interpolation="random"):
    """Mixup (batch-reversed partner, lambda from torch's global RNG) and smoothed dense targets; no draws
    from the per-rank generator, so DDP and one process see the same batches."""

    def augment(images, labels, generator=None):
        x = memory_normalize(images)
        off = label_smoothing / num_classes
        target = torch.full((x.shape[0], num_classes), off, device=x.device)
        target.scatter_(1, labels[:, None], 1.0 - label_smoothing + off)
        if mixup_alpha > 0:
            lam = torch.distributions.Beta(mixup_alpha, mixup_alpha).sample()  # global torch RNG
            lam = float(lam)
            x = lam * x + (1 - lam) * x.flip(0)
            target = lam * target + (1 - lam) * target.flip(0)
        return x.to(dtype), target

    return augment


MEMORY = dict(make_loader=make_memory_loader, make_augment=make_memory_augment, normalize=memory_normalize)


def tiny_recipe(**changes):
    base = dict(epochs=6, train_res=32, test_res=32, global_batch=16, warmup_epochs=1, lr=8e-3 * 2048 / 16 / 4,
                mixup_alpha=0.0, cutmix_alpha=0.0, rand_augment="", model="test_resnet")
    base.update(changes)
    return override(A3, base)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_prepare_device_without_cuda():
    assert prepare_device("cpu") == torch.device("cpu")
    with pytest.raises(FastRSBError, match="sees no CUDA GPU; pass --device cpu"):
        prepare_device("cuda")


def test_plan_batches():
    assert plan_batches(2048, 1, 256) == plan_batches(2048, 1, 256)
    layout = plan_batches(2048, 1, 256)
    assert (layout.batch_per_gpu, layout.accum_steps) == (256, 8)
    assert (plan_batches(2048, 8, 256).batch_per_gpu, plan_batches(2048, 8, 256).accum_steps) == (256, 1)
    assert (plan_batches(2048, 8, 2048).batch_per_gpu, plan_batches(2048, 8, 2048).accum_steps) == (256, 1)
    layout = plan_batches(2046, 3, 300)
    assert layout.world_size * layout.batch_per_gpu * layout.accum_steps == layout.global_batch
    assert layout.batch_per_gpu <= 300
    with pytest.raises(FastRSBError):
        plan_batches(2048, 3, 256)
    assert "2 GPUs x 128 per GPU x 4 accumulation steps" in plan_batches(1024, 2, 200).describe()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """4 classes, 30 train and 10 val images each, converted as a user would."""
    root = tmp_path_factory.mktemp("demo")
    assert fastrsb_main(["demo-data", str(root / "src"), "--classes", "4", "--train-per-class", "30",
                         "--val-per-class", "10", "--max-size", "96", "--min-size", "64"]) == 0
    assert fastrsb_main(["convert", str(root / "src"), str(root / "data"), "--format", "beton,dali",
                         "--no-progress", "--workers", "1"]) == 0
    return root / "data"


def real_recipe(**changes):
    """A3 (RandAugment m6, mixup 0.1 / cutmix 1.0, BCE 0.2) at 32 px and global batch 16."""
    return tiny_recipe(mixup_alpha=A3.mixup_alpha, cutmix_alpha=A3.cutmix_alpha, rand_augment=A3.rand_augment,
                       **changes)


def test_trains_and_beats_chance(demo_data, tmp_path, capsys):
    recipe = real_recipe(epochs=8)
    summary = train(recipe, demo_data, "pil", out_dir=tmp_path / "run", batch_per_gpu=8, eval_every_epochs=3,
                    log_every_steps=2, progress=False, num_workers=0, device="cpu")
    out = capsys.readouterr().out
    assert "global batch 16 = 1 CPU process x 8 per process x 2 accumulation steps" in out
    assert "scaled linearly" in out
    assert summary["finished"] and summary["steps"] == 8 * (120 // 16)
    assert summary["top1"] >= 70.0, summary  # chance is 25%
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("epoch") == 8 and "step" in kinds and kinds[-1] == "summary"
    assert [r["epoch"] for r in records if r["kind"] == "epoch" and "top1" in r] == [2, 5, 7]
    info = json.loads((run / "run.json").read_text())
    assert info["recipe"]["global_batch"] == 16 and info["versions"]["torch"] == torch.__version__
    assert info["base_lr"] == pytest.approx(recipe.lr * 16 / 2048) and info["loader_backend"] == "pil"
    assert "git_revision" in info and info["summary"]["top1"] == summary["top1"]
    # Final weights load into a plain timm model and give the reported accuracy.
    model = timm.create_model("test_resnet", num_classes=4)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    again = evaluate(model, demo_data, "pil", res=32, crop_pct=recipe.test_crop_pct, batch_size=16, num_workers=0,
                     device="cpu")
    assert again["top1"] == pytest.approx(summary["top1"]) and again["samples"] == 40
    from_run = evaluate(run, demo_data, "pil", num_workers=0, device="cpu")
    assert from_run["top1"] == pytest.approx(summary["top1"]) and from_run["res"] == 32
    with pytest.raises(FastRSBError, match="already holds a run"):
        train(recipe, demo_data, "pil", out_dir=run, batch_per_gpu=8, progress=False, num_workers=0, device="cpu")


def _state(path):
    return torch.load(path, weights_only=True)


def _assert_same_weights(a_path, b_path):
    a, b = _state(a_path), _state(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs ({a_path} vs {b_path})"


def test_interrupted_and_resumed_equals_uninterrupted(demo_data, tmp_path):
    # RandAugment + mixup/cutmix (augmentation generator), drop-path (global RNG) and EMA all on.
    recipe = real_recipe(epochs=3, ema_decay=0.9, drop_path_rate=0.1, global_batch=24)
    kw = dict(batch_per_gpu=12, eval_every_epochs=2, log_every_steps=3, progress=False, num_workers=0, device="cpu")
    full = train(recipe, demo_data, "pil", out_dir=tmp_path / "full", **kw)
    part = train(recipe, demo_data, "pil", out_dir=tmp_path / "part", stop_after_epochs=2, **kw)
    assert not part["finished"] and not (tmp_path / "part" / "model.pt").exists()
    ckpt = _state(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (120 // 24)
    # A copy of the checkpoint with the augmentation RNG reset, to show that the restored state matters.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    ckpt["rng"][0]["augment"] = torch.Generator().manual_seed(99).get_state()
    torch.save(ckpt, tampered / "checkpoint.pt")

    resumed = train(recipe, demo_data, "pil", out_dir=tmp_path / "part", resume=True, **kw)
    assert resumed["finished"] and resumed["steps"] == full["steps"]
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "part" / "model.pt")
    _assert_same_weights(tmp_path / "full" / "model_ema.pt", tmp_path / "part" / "model_ema.pt")
    assert resumed["top1"] == full["top1"] and resumed["ema_top1"] == full["ema_top1"]

    train(recipe, demo_data, "pil", out_dir=tampered, resume=True, **kw)
    with pytest.raises(AssertionError):
        _assert_same_weights(tmp_path / "full" / "model.pt", tampered / "model.pt")
    with pytest.raises(FastRSBError, match="different recipe"):
        train(dataclasses.replace(recipe, lr=1.0), demo_data, "pil", out_dir=tmp_path / "part", resume=True, **kw)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    recipe = tiny_recipe(epochs=4)
    calls = {"n": 0}

    def make_poisoned_augment(*args, **kwargs):
        inner = make_memory_augment(*args, **kwargs)

        def augment(images, labels, generator=None):
            calls["n"] += 1
            x, t = inner(images, labels, generator)
            return (x * float("nan"), t) if calls["n"] > 2 * 14 + 3 else (x, t)  # poisoned in epoch 3

        return augment

    kw = dict(MEMORY, make_augment=make_poisoned_augment, device="cpu")
    with pytest.raises(FastRSBError, match="loss became nan.*last good checkpoint"):
        train(recipe, "unused", "memory", out_dir=tmp_path / "run", batch_per_gpu=8, log_every_steps=2,
              progress=False, **kw)
    ckpt = _state(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    """bf16 autocast, and fp16 with its GradScaler, run the same loop (on CUDA they are the defaults/options)."""
    summary = train(tiny_recipe(epochs=3), "unused", "memory", out_dir=tmp_path / "run", batch_per_gpu=8, device="cpu",
                    precision=precision, eval_every_epochs=3, log_every_steps=3, progress=False, **MEMORY)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == precision
    assert summary["top1"] > 50.0
    ckpt = _state(tmp_path / "run" / "checkpoint.pt")
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # the GradScaler state travels with the checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, recipe_dict, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastrsb.recipes import Recipe

    recipe = Recipe(**recipe_dict)
    summary = train(recipe, "unused", "memory", out_dir=out_dir, batch_per_gpu=8, eval_every_epochs=2,
                    log_every_steps=100, progress=False, device="cpu", **MEMORY)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def test_ddp_two_processes_match_one(tmp_path):
    """Same global batch 16: 2 gloo ranks x 8 against 1 process x 16. A model with batch-independent
    normalisation (LayerNorm), no random augmentation: only the summation order differs."""
    recipe = tiny_recipe(epochs=2, model="test_convnext")
    recipe_dict = dataclasses.asdict(recipe)
    recipe_dict["rrc_scale"], recipe_dict["rrc_ratio"] = tuple(recipe.rrc_scale), tuple(recipe.rrc_ratio)
    mp.spawn(_ddp_worker, args=(2, _free_port(), recipe_dict, str(tmp_path / "ddp"), str(tmp_path)), nprocs=2,
             join=True)
    single = train(recipe, "unused", "memory", out_dir=tmp_path / "single", batch_per_gpu=16, eval_every_epochs=2,
                   log_every_steps=100, progress=False, device="cpu", **MEMORY)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["layout"] == {"global_batch": 16, "world_size": 2, "batch_per_gpu": 8, "accum_steps": 1,
                           "device_type": "cpu"}
    assert single["layout"]["accum_steps"] == 1 and r0["steps"] == single["steps"] == 2 * 7
    assert r0["top1"] == r1["top1"]  # evaluation counts are all-reduced
    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 writes them
    a, b = _state(tmp_path / "ddp" / "model.pt"), _state(tmp_path / "single" / "model.pt")
    moved = 0
    torch.manual_seed(0)  # train seeds with seed=0 before it creates the model
    init = timm.create_model("test_convnext", num_classes=4).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.allclose(a[k], init[k]))
    assert moved > len(a) // 2


def test_cli_train_and_eval(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--recipe", "a3", "--data", str(demo_data), "--loader", "pil", "--model", "test_resnet",
            "--out", str(run), "--batch-per-gpu", "16", "--workers", "0", "--no-progress", "--eval-every", "1",
            "--device", "cpu",
            "epochs=1", "train_res=32", "test_res=32", "global_batch=16", "warmup_epochs=0"]
    assert fastrsb_main(argv) == 0
    out = capsys.readouterr().out
    assert "global batch 16 = 1 CPU process x 16 per process x 1 accumulation step" in out and "summary:" in out
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["finished"] and summary["steps"] == 120 // 16
    assert fastrsb_main(["eval", str(run), "--data", str(demo_data), "--loader", "pil", "--workers", "0",
                         "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["top1"]) and result["samples"] == 40
    # user errors come back as messages and status 2, not tracebacks
    assert fastrsb_main(argv[:-4] + ["epochz=1"]) == 2
    assert "unknown recipe key 'epochz'" in capsys.readouterr().err
    assert fastrsb_main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert fastrsb_main(argv[:10] + [str(tmp_path / "nothing")] + argv[11:] + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_checkpoint_stores_each_fact_once_and_reads_formats_1_and_2(tmp_path):
    """The epoch is stored once and the world size is the number of RNG states; a format-1 checkpoint (which
    stored both twice) and a format-2 one (no mid-epoch fields) still resume exactly, and a format this
    fastrsb does not know is refused by name."""
    import shutil

    from fastrsb.checkpoint import CHECKPOINT_FORMAT

    recipe = tiny_recipe(epochs=2)
    kw = dict(batch_per_gpu=8, eval_every_epochs=2, log_every_steps=100, progress=False, device="cpu", **MEMORY)
    train(recipe, "unused", "memory", out_dir=tmp_path / "full", **kw)
    train(recipe, "unused", "memory", out_dir=tmp_path / "part", stop_after_epochs=1, **kw)
    ckpt = _state(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT == 3
    assert ckpt["epoch"] == 1 and ckpt["step"] == 120 // 16 and len(ckpt["rng"]) == 1 and ckpt["epoch_step"] == 0
    assert "loader" not in ckpt and "world_size" not in ckpt and "epoch_loss" not in ckpt
    assert not list((tmp_path / "part").glob("*.tmp"))  # the atomic write left no temporary behind

    format_2 = {k: v for k, v in ckpt.items() if k not in ("epoch_step", "steps_per_epoch")}
    for name, old_ckpt in (("old1", {**format_2, "format": 1, "loader": {"epoch": 1, "batch": 0}, "world_size": 1}),
                           ("old2", {**format_2, "format": 2})):
        old = tmp_path / name
        shutil.copytree(tmp_path / "part", old)
        torch.save(old_ckpt, old / "checkpoint.pt")
        assert train(recipe, "unused", "memory", out_dir=old, resume=True, **kw)["finished"]
        _assert_same_weights(tmp_path / "full" / "model.pt", old / "model.pt")

    future = tmp_path / "future"
    future.mkdir()
    torch.save({**ckpt, "format": 99}, future / "checkpoint.pt")
    with pytest.raises(FastRSBError, match=r"future/checkpoint\.pt is a fastrsb checkpoint of format 99.*another --out"):
        train(recipe, "unused", "memory", out_dir=future, resume=True, **kw)
