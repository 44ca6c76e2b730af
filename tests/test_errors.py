"""Bad input to train, eval and bench ends in one line naming the input and the fix, status 2, no traceback
(issue 12), and the trainer pieces that make a run honest: resumed logs without repeats, the per-GPU batch
probe, progressive resizing, the side-stream input pipeline (its CPU path)."""
from __future__ import annotations

import json

import pytest
import torch

from fastrsb.cli import main as fastrsb_main
from fastrsb.errors import FastRSBError
from test_train import MEMORY, tiny_recipe
from fastrsb.train import train

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 3-class source ImageFolder (read by the PIL backend directly) and a 4-class trained run."""
    root = tmp_path_factory.mktemp("err")
    assert fastrsb_main(["demo-data", str(root / "src3"), "--classes", "3", "--train-per-class", "4",
                         "--val-per-class", "4", "--max-size", "48", "--min-size", "32"]) == 0
    train(tiny_recipe(epochs=1), "unused", "memory", out_dir=root / "run4", batch_per_gpu=8, progress=False,
          device="cpu", **MEMORY)
    return root


def _fails(capsys, argv, *needles):
    assert fastrsb_main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_eval_refuses_data_with_other_classes(folders, capsys):
    _fails(capsys, ["eval", str(folders / "run4"), "--data", str(folders / "src3"), "--loader", "pil",
                    "--workers", "0", "--device", "cpu"], "trained on 4 classes", "has 3")


def test_eval_wrong_num_classes_and_junk_files(folders, tmp_path, capsys):
    _fails(capsys, ["eval", str(folders / "run4" / "model.pt"), "--model", "test_resnet", "--num-classes", "7",
                    "--data", str(folders / "src3"), "--loader", "pil", "--device", "cpu"],
           "--num-classes 7", "trained with 4 classes")
    bare = tmp_path / "bare.pt"  # a state_dict with no run.json beside it
    bare.write_bytes((folders / "run4" / "model.pt").read_bytes())
    _fails(capsys, ["eval", str(bare), "--model", "test_resnet", "--num-classes", "7", "--data",
                    str(folders / "src3"), "--loader", "pil", "--device", "cpu"],
           "does not fit a test_resnet with 7 classes")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    err = _fails(capsys, ["eval", str(junk), "--model", "test_resnet", "--num-classes", "3", "--data",
                          str(folders / "src3"), "--device", "cpu"], str(junk))
    assert "weights_only=False" not in err  # never advise loading pickled code


@pytest.mark.parametrize("override", ["epochs=0", "epochs=-1", "lr=nan", "lr=-1", "rand_augment=garbage"])
def test_train_refuses_recipes_that_cannot_train(folders, tmp_path, capsys, override):
    out = tmp_path / "run"
    field = override.split("=")[0]
    _fails(capsys, ["train", override, "--data", str(folders / "src3"), "--loader", "pil", "--out", str(out),
                    "--device", "cpu"], f"{field}=")
    assert not (out / "model.pt").exists()  # nothing pretends to be a trained model


@pytest.mark.parametrize("option", ["--eval-every", "--log-every"])
def test_zero_intervals_are_refused_up_front(folders, tmp_path, capsys, option):
    assert fastrsb_main(["train", "--data", str(folders / "src3"), option, "0", "--out", str(tmp_path / "r")]) == 2
    assert "is not at least 1" in capsys.readouterr().err
    with pytest.raises(FastRSBError, match=option):
        train(tiny_recipe(), "unused", "memory", out_dir=tmp_path / "r", device="cpu",
              **{("eval_every_epochs" if option == "--eval-every" else "log_every_steps"): 0}, **MEMORY)
    assert not (tmp_path / "r").exists()


def test_hw_decoder_load_reaches_both_loaders_and_is_checked(tmp_path, capsys):
    from test_train import make_memory_loader

    seen = []

    def loader(backend, data, split, **kwargs):
        seen.append((split, kwargs.pop("hw_decoder_load", None)))
        return make_memory_loader(backend, data, split, **kwargs)

    train(tiny_recipe(), "unused", "memory", out_dir=tmp_path / "r", device="cpu", hw_decoder_load=0.65,
          progress=False, **{**MEMORY, "make_loader": loader})
    assert seen == [("train", 0.65), ("val", 0.65)]
    with pytest.raises(FastRSBError, match="--hw-decoder-load 1.5"):
        train(tiny_recipe(), "unused", "memory", out_dir=tmp_path / "r2", device="cpu", hw_decoder_load=1.5,
              **MEMORY)
    assert fastrsb_main(["train", "--data", "unused", "--hw-decoder-load", "-1", "--out", str(tmp_path / "r3")]) == 2
    assert "--hw-decoder-load -1" in capsys.readouterr().err and not (tmp_path / "r3").exists()


def test_bench_loader_arguments(capsys):
    _fails(capsys, ["bench", "loader", "--demo", "--backends", "xyz"], "--backends", "xyz")
    _fails(capsys, ["bench", "loader", "--demo", "--sizes", "abc"], "--sizes", "abc")


def test_overrides_may_stand_before_options(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert fastrsb_main(["train", "epochs=1", "train_res=32", "test_res=32", "global_batch=8", "warmup_epochs=0",
                         "--data", str(folders / "src3"), "--loader", "pil", "--model", "test_resnet",
                         "--out", str(out), "--batch-per-gpu", "8", "--workers", "0", "--no-progress",
                         "--device", "cpu", "rand_augment="]) == 0
    assert json.loads((out / "run.json").read_text())["recipe"]["epochs"] == 1
    _fails(capsys, ["train", "--data", str(folders / "src3"), "stray", "--out", str(tmp_path / "x")],
           "unrecognized arguments: stray")


def test_pil_over_a_source_folder_names_a_broken_file(folders, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folders / "src3", src)
    victim = sorted((src / "train").rglob("*.*"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated JPEG
    from fastrsb.loaders import make_loader

    loader = make_loader("pil", src, "train", batch_size=12, res=32, device="cpu", num_workers=0, drop_last=False)
    with pytest.raises(FastRSBError, match=victim.name):
        list(loader)


def test_resumed_log_has_no_repeated_steps(tmp_path):
    kw = dict(batch_per_gpu=8, log_every_steps=1, progress=False, device="cpu", **MEMORY)
    recipe = tiny_recipe(epochs=3)
    train(recipe, "unused", "memory", out_dir=tmp_path / "run", stop_after_epochs=1, **kw)
    log = tmp_path / "run" / "log.jsonl"
    lines = log.read_text().splitlines()
    # a run killed during epoch 2 leaves step records past its last checkpoint
    with open(log, "a") as f:
        for step in range(8, 11):
            f.write(json.dumps({"kind": "step", "epoch": 1, "step": step, "loss": 1.0}) + "\n")
    train(recipe, "unused", "memory", out_dir=tmp_path / "run", resume=True, **kw)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 3 * 7 and len(lines) > 0
    assert [r["kind"] for r in records].count("summary") == 1


def test_batch_probe_halves_on_out_of_memory_and_caches(tmp_path):
    from fastrsb.runtime import probe_batch_per_gpu

    tried = []

    def try_batch(b):
        tried.append(b)
        if b > 300:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    cache = tmp_path / "probe.json"
    assert probe_batch_per_gpu(try_batch, 2048, "H100|resnet50|160px|bf16", cache=cache, log=lambda m: None) == 256
    assert tried == [2048, 1024, 512, 256]
    tried.clear()
    assert probe_batch_per_gpu(try_batch, 2048, "H100|resnet50|160px|bf16", cache=cache, log=lambda m: None) == 256
    assert tried == []  # cached per (GPU, model, res, precision)
    assert probe_batch_per_gpu(try_batch, 96, "other", cache=cache, log=lambda m: None) == 96

    def never(b):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(FastRSBError, match="runs out of memory"):
        probe_batch_per_gpu(never, 8, "tiny", cache=None, log=lambda m: None)

    # a batch that fits but leaves no headroom for the step's other buffers does not count as fitting
    said = []
    peaks = {2048: None, 1024: 0.97, 512: 0.86, 256: 0.5}
    assert probe_batch_per_gpu(lambda b: peaks[b] if b < 2048 else never(b), 2048, "headroom", cache=None,
                               log=said.append) == 256
    assert "2048 runs out of memory" in said[0] and "1024 peaks at 97% of GPU memory" in said[1]
    assert "512 peaks at 86%" in said[2] and len(said) == 3

    # memory outside torch's allocator (DALI's, allocated after the probe) counts beside the probed peak
    said.clear()
    peaks = {2048: 0.8, 1024: 0.6, 512: 0.4}
    assert probe_batch_per_gpu(peaks.get, 2048, "reserved", cache=None, log=said.append,
                               reserved=lambda b: 0.3 * b / 2048) == 1024
    assert said == ["  batch per GPU 2048 peaks at 80% of GPU memory + 30% for the loaders (at most 85% is kept "
                    "for the step itself); trying 1024"]


def test_the_probe_reserves_dalis_memory_for_the_train_and_val_pipelines():
    pytest.importorskip("nvidia.dali")
    from fastrsb.loaders.dali_loader import _DEVICE_MEMORY_PADDING, gpu_memory_estimate
    from fastrsb.recipes import A3
    from fastrsb.train import loader_reserve

    assert loader_reserve("pil", A3, 16) is None and loader_reserve("ffcv", A3, 16) is None
    reserve = loader_reserve("dali", A3, 16)
    assert reserve is not None and loader_reserve("auto", A3, 16)(256) == reserve(256)
    # two pipelines of 16 threads' nvJPEG padding, and three decoded batches each at 160 (train) and 224 (val)
    assert reserve(2048) == 2 * 16 * _DEVICE_MEMORY_PADDING + 3 * 2048 * 3 * (160 ** 2 + 224 ** 2)
    assert 6e9 < reserve(2048) < 9e9 and reserve(1024) < reserve(2048)
    assert gpu_memory_estimate(8, 64, 0) == _DEVICE_MEMORY_PADDING + 3 * 8 * 3 * 64 * 64


def test_the_probe_reserve_takes_nvjpegs_padding_from_the_converted_images(converted):
    """With the converted folder at hand, each pipeline's per-thread padding is its split's own
    (decoder_padding), far below the 211 MB cap for small images."""
    pytest.importorskip("nvidia.dali")
    from fastrsb.loaders.dali_loader import decoder_padding, gpu_memory_estimate
    from fastrsb.loaders.layout import ShardIndex
    from fastrsb.recipes import A3
    from fastrsb.train import loader_reserve

    pads = {s: decoder_padding(ShardIndex.load(converted, s).heights, ShardIndex.load(converted, s).widths)
            for s in ("train", "val")}
    reserve = loader_reserve("dali", A3, 16, converted)
    assert reserve(2048) == (gpu_memory_estimate(2048, 160, 16, padding=pads["train"])
                             + gpu_memory_estimate(2048, 224, 16, padding=pads["val"]))
    assert reserve(2048) < loader_reserve("dali", A3, 16)(2048)


def test_progressive_resizing_ramp():
    from fastrsb.recipes import A3, override
    from fastrsb.schedule import res_at

    assert [res_at(e, 160) for e in (0, 50, 99)] == [160, 160, 160]  # off in the RSB recipes
    ramp = [res_at(e, 160, (128, 192), (10, 20)) for e in range(0, 25)]
    assert ramp[:11] == [128] * 11 and ramp[20:] == [192] * 5
    assert all(r % 32 == 0 for r in ramp) and ramp == sorted(ramp) and len(set(ramp)) == 3
    recipe = override(A3, ["progressive_res=128,192", "progressive_epochs=0,80"])
    assert recipe.progressive_res == (128, 192)


def test_progressive_resizing_reaches_the_loader(tmp_path):
    seen = []

    def make_loader(*args, **kwargs):
        loader = MEMORY["make_loader"](*args, **kwargs)
        original = loader.set_epoch

        def set_epoch(epoch, res=None):
            seen.append(res)
            return original(epoch, res)

        loader.set_epoch = set_epoch
        return loader

    recipe = tiny_recipe(epochs=3, progressive_res=(32, 64), progressive_epochs=(0, 2))
    summary = train(recipe, "unused", "memory", out_dir=tmp_path / "run", batch_per_gpu=8, progress=False,
                    device="cpu", **dict(MEMORY, make_loader=make_loader))
    assert seen[:3] == [32, 32, 64] and summary["finished"]


def test_augmented_batches_are_the_augment_of_each_loader_batch():
    from fastrsb.prefetch import AugmentedBatches

    batches = [(torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.tensor([i, i])) for i in range(5)]
    calls = []

    def augment(images, labels, generator=None):
        calls.append(int(labels[0]))
        return images.float() + 0.5, labels

    out = list(AugmentedBatches(iter(batches), augment, None, "cpu", count=3))
    assert len(out) == 3 and calls == [0, 1, 2]  # never draws past `count`
    assert all(torch.equal(x, batches[i][0].float() + 0.5) for i, (x, _) in enumerate(out))


def test_corrupted_checkpoint_is_named_not_loaded(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_recipe(epochs=2), "unused", "memory", out_dir=run, batch_per_gpu=8, progress=False, device="cpu",
          stop_after_epochs=1, **MEMORY)
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])  # a torn file (fastrsb itself writes atomically)
    with pytest.raises(FastRSBError, match="checkpoint.pt"):
        train(tiny_recipe(epochs=2), "unused", "memory", out_dir=run, batch_per_gpu=8, progress=False,
              device="cpu", resume=True, **MEMORY)
    assert (run / "log.jsonl").exists() and (run / "run.json").exists()  # nothing else was touched


def test_kill_during_training_then_resume_equals_uninterrupted(folders, tmp_path):
    """kill -9 of `fastrsb train` after its first checkpoint; --resume ends with the weights of a run never killed."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, wait_for

    def argv(out):
        return [sys.executable, "-m", "fastrsb", "train", "--data", str(folders / "src3"), "--loader", "pil",
                "--model", "test_resnet", "--out", str(out), "--batch-per-gpu", "8", "--workers", "0",
                "--no-progress", "--device", "cpu", "--eval-every", "5", "epochs=4", "train_res=32", "test_res=32",
                "global_batch=8", "warmup_epochs=1", "rand_augment=rand-m6-mstd0.5-inc1"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(argv(tmp_path / "full"), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(argv(tmp_path / "killed"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    assert wait_for(ckpt.exists, proc, timeout=300), "no checkpoint before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model.pt").exists()
    subprocess.run(argv(tmp_path / "killed") + ["--resume"], check=True, cwd=REPO, env=env, capture_output=True,
                   timeout=600)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_compares_class_names_not_just_their_count(folders):
    from types import SimpleNamespace

    from fastrsb.evaluate import check_classes
    from fastrsb.loaders import make_loader

    loader = make_loader("pil", folders / "src3", "val", batch_size=4, res=32, device="cpu", num_workers=0)
    assert loader.classes and loader.num_classes == len(loader.classes) == 3
    check_classes(list(loader.classes), 3, loader, folders / "src3")  # the same classes: fine
    renamed = list(loader.classes[:2]) + ["zebra"]
    with pytest.raises(FastRSBError, match="zebra"):
        check_classes(renamed, 3, SimpleNamespace(classes=loader.classes, num_classes=3), folders / "src3")


def test_cuda_graph_compile_modes_refuse_gradient_accumulation():
    """A CUDA graph's backward writes gradients into its own buffers, which the next micro-batch's replay
    overwrites (pytorch#169545): refused up front, with the modes that do work."""
    from fastrsb.optim import Lamb
    from fastrsb.step import TrainStep

    model = torch.nn.Linear(4, 2)
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(FastRSBError, match="cannot accumulate gradients over 2 micro-batches.*default"):
            TrainStep(model, Lamb(model.parameters()), torch.nn.functional.mse_loss, device=torch.device("cuda"),
                      accum_steps=2, compile_mode=mode)
