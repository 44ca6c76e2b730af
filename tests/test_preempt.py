"""Runs that survive the cluster (issue 20): SIGTERM/SIGUSR1 checkpoint and stop, mid-epoch resume is
exact on every backend, one writer per output folder, and a killed rank never hangs the others."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tree_bytes, wait_for
from fastrsb.cli import main as fastrsb_main
from fastrsb.errors import FastRSBError
from fastrsb.lock import LOCK_NAME, FolderInUse, OutputLock
from fastrsb.train import train
from test_train import (MEMORY, _assert_same_weights, _free_port, _state, demo_data,  # noqa: F401 (a fixture)
                        make_memory_augment, real_recipe, tiny_recipe)

TIMING = ("img_per_s", "train_time_s", "time_s", "wall_time_s")


def _records(run: Path, kinds=("step", "epoch")) -> list[dict]:
    """The run's log records of these kinds, without their timings."""
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] in kinds:
            out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


def _signalling_augment(make_augment, at: dict):
    """make_augment whose train augmentation sends itself `at[draw]` when it is called for that draw
    (counted from 1), as a scheduler's signal arriving while the loader and augmentation work."""
    def make(*args, **kwargs):
        inner = make_augment(*args, **kwargs)
        calls = {"n": 0}

        def augment(images, labels, generator=None):
            calls["n"] += 1
            for sig in at.get(calls["n"], ()):
                os.kill(os.getpid(), sig)
            return inner(images, labels, generator=generator)

        for name in ("constants", "kernel_sequence"):  # what compile_augment and benchmarks may look for
            if hasattr(inner, name):
                setattr(augment, name, getattr(inner, name))
        return augment
    return make


# ------------------------------------------------------------------------------------ signals, in-process

# 120 samples at global batch 16: 7 steps per epoch. (signals by draw, micro-batch, expected epoch_step)
CASES = {
    "sigterm-first-step": (1, {1: [signal.SIGTERM]}, 1),
    "sigusr1-mid-epoch-2": (1, {7 + 4: [signal.SIGUSR1]}, 4),
    "sigterm-twice-accum": (2, {2 * 7 + 5: [signal.SIGTERM], 2 * 7 + 6: [signal.SIGTERM]}, 3),
    "sigterm-last-step-of-epoch": (1, {7: [signal.SIGTERM]}, 0),  # the epoch's own checkpoint, then stop
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_checkpoints_after_the_step_and_resume_is_exact(case, tmp_path):
    accum, at, epoch_step = CASES[case]
    recipe = tiny_recipe(epochs=3, mixup_alpha=0.2, drop_path_rate=0.1, ema_decay=0.9)
    kw = dict(batch_per_gpu=16 // accum, eval_every_epochs=2, log_every_steps=3, progress=False, device="cpu",
              make_loader=MEMORY["make_loader"], normalize=MEMORY["normalize"])
    full = train(recipe, "unused", "memory", out_dir=tmp_path / "full", make_augment=make_memory_augment, **kw)
    part = train(recipe, "unused", "memory", out_dir=tmp_path / "part",
                 make_augment=_signalling_augment(make_memory_augment, at), **kw)
    first_signal = signal.Signals(at[min(at)][0]).name
    assert part["stopped_by"] == first_signal and not part["finished"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are taken down again
    ckpt = _state(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["epoch_step"] == epoch_step and not (tmp_path / "part" / "model.pt").exists()
    assert ckpt["step"] == part["steps"] == (ckpt["epoch"] * 7 + epoch_step)
    if epoch_step:
        assert {"kind": "checkpoint", "epoch": ckpt["epoch"], "step": ckpt["step"], "epoch_step": epoch_step,
                "reason": first_signal} in _records(tmp_path / "part", ("checkpoint",))

    resumed = train(recipe, "unused", "memory", out_dir=tmp_path / "part", resume=True,
                    make_augment=make_memory_augment, **kw)
    assert resumed["finished"] and resumed["steps"] == full["steps"] and resumed["stopped_by"] is None
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "part" / "model.pt")
    _assert_same_weights(tmp_path / "full" / "model_ema.pt", tmp_path / "part" / "model_ema.pt")
    # the resumed epoch's running sums came back too: every logged loss is the uninterrupted run's
    assert _records(tmp_path / "part") == _records(tmp_path / "full")


def test_sigterm_during_the_checkpoint_write_stops_after_the_next_step(tmp_path, monkeypatch):
    """The signal lands while epoch 1's checkpoint is written: the write completes, the run stops one
    step later with a mid-epoch checkpoint, and resume is exact."""
    from fastrsb import runmeta

    recipe = tiny_recipe(epochs=2)
    kw = dict(batch_per_gpu=16, eval_every_epochs=2, log_every_steps=100, progress=False, device="cpu", **MEMORY)
    full = train(recipe, "unused", "memory", out_dir=tmp_path / "full", **kw)
    real = runmeta.save_atomic
    signalled = []

    def save_atomic(obj, path):
        if Path(path).name == "checkpoint.pt" and not signalled:
            signalled.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(obj, path)

    monkeypatch.setattr(runmeta, "save_atomic", save_atomic)
    part = train(recipe, "unused", "memory", out_dir=tmp_path / "part", **kw)
    monkeypatch.setattr(runmeta, "save_atomic", real)
    assert part["stopped_by"] == "SIGTERM" and part["steps"] == 7 + 1
    assert _state(tmp_path / "part" / "checkpoint.pt")["epoch_step"] == 1
    assert train(recipe, "unused", "memory", out_dir=tmp_path / "part", resume=True, **kw)["steps"] == full["steps"]
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "part" / "model.pt")


def test_checkpoint_every_steps_writes_mid_epoch_checkpoints(tmp_path):
    recipe = tiny_recipe(epochs=1)
    kw = dict(batch_per_gpu=16, log_every_steps=100, progress=False, device="cpu", **MEMORY)
    train(recipe, "unused", "memory", out_dir=tmp_path / "run", checkpoint_every_steps=3, **kw)
    saved = [r["epoch_step"] for r in _records(tmp_path / "run", ("checkpoint",))]
    assert saved == [3, 6]  # step 7 ends the epoch: its own checkpoint
    with pytest.raises(FastRSBError, match="checkpoint-every-steps"):
        train(recipe, "unused", "memory", out_dir=tmp_path / "other", checkpoint_every_steps=0, **kw)


# ------------------------------------------- every backend, real augmentation (test_train's demo_data)

@pytest.mark.parametrize("backend,accum,repeats", [("pil", 2, 3), ("pil", 1, 0), ("dali", 2, 3), ("dali", 1, 0),
                                                   ("ffcv", 2, 3)])
def test_sigterm_mid_epoch_then_resume_is_bit_identical_on_every_backend(demo_data, tmp_path, backend, accum,
                                                                         repeats):
    """RandAugment + mixup/cutmix (the augmentation generator, prefetched a draw ahead), drop path, EMA,
    with and without accumulation and repeated augmentation: stopped after step 2 of epoch 2, resumed,
    the weights are those of the run never stopped."""
    from fastrsb.augment import make_train_augment

    recipe = real_recipe(epochs=2, global_batch=24, aug_repeats=repeats, drop_path_rate=0.1, ema_decay=0.9)
    kw = dict(batch_per_gpu=24 // accum, eval_every_epochs=2, log_every_steps=2, progress=False, num_workers=1,
              device="cpu")
    train(recipe, demo_data, backend, out_dir=tmp_path / "full", **kw)
    # 5 steps per epoch: the signal comes with the first micro-batch of step 7, epoch 1's second
    signal_draw = 6 * accum + 1
    part = train(recipe, demo_data, backend, out_dir=tmp_path / "part",
                 make_augment=_signalling_augment(make_train_augment, {signal_draw: [signal.SIGTERM]}), **kw)
    assert part["stopped_by"] == "SIGTERM"
    ckpt = _state(tmp_path / "part" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (1, 2)
    train(recipe, demo_data, backend, out_dir=tmp_path / "part", resume=True, **kw)
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "part" / "model.pt")
    _assert_same_weights(tmp_path / "full" / "model_ema.pt", tmp_path / "part" / "model_ema.pt")


# --------------------------------------------------------------------------------- the command, for real

def _train_argv(data, out, *extra, epochs=2, global_batch=8):
    return [sys.executable, "-m", "fastrsb", "train", "--data", str(data), "--loader", "pil", "--model",
            "test_resnet", "--out", str(out), "--batch-per-gpu", "8", "--workers", "0", "--no-progress",
            "--device", "cpu", "--eval-every", "5", "--log-every", "1", *extra, f"epochs={epochs}", "train_res=32",
            "test_res=32", f"global_batch={global_batch}", "warmup_epochs=1", "rand_augment=rand-m6-mstd0.5-inc1"]


def _steps_logged(run: Path) -> int:
    try:
        return sum(1 for line in (run / "log.jsonl").read_text().splitlines() if '"kind": "step"' in line)
    except OSError:
        return 0


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_sigterm_to_fastrsb_train_exits_75_and_resumes_exactly(demo_data, tmp_path):
    src = demo_data.parent / "src"
    subprocess.run(_train_argv(src, tmp_path / "full"), check=True, cwd=REPO, env=ENV, capture_output=True,
                   timeout=600)
    proc = subprocess.Popen(_train_argv(src, tmp_path / "cut"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: _steps_logged(tmp_path / "cut") >= 3, proc, timeout=300), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGTERM received: finishing this step" in err and "stopped by SIGTERM" in out, (out, err)
    assert "Traceback" not in err
    assert not (tmp_path / "cut" / "model.pt").exists()
    subprocess.run(_train_argv(src, tmp_path / "cut", "--resume"), check=True, cwd=REPO, env=ENV,
                   capture_output=True, timeout=600)
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "cut" / "model.pt")


KILL_DURING_SECOND_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
from fastrsb import runmeta
real, seen = runmeta.write_atomic, []
def write_atomic(path, data):
    if Path(path).name == "checkpoint.pt":
        seen.append(path)
        if len(seen) == 2:  # the grace period runs out halfway through writing the second checkpoint
            def half(f):
                data(f)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
    return real(path, data)
runmeta.write_atomic = write_atomic
from fastrsb.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_during_the_checkpoint_write_keeps_the_previous_checkpoint(demo_data, tmp_path):
    src = demo_data.parent / "src"
    subprocess.run(_train_argv(src, tmp_path / "full"), check=True, cwd=REPO, env=ENV, capture_output=True,
                   timeout=600)
    argv = _train_argv(src, tmp_path / "cut", "--checkpoint-every-steps", "2")
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_CHECKPOINT, *argv[3:]], cwd=REPO, env=ENV,
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "cut" / "checkpoint.pt.tmp").exists()  # the torn write, beside the intact checkpoint
    assert _state(tmp_path / "cut" / "checkpoint.pt")["step"] == 2
    subprocess.run(argv + ["--resume"], check=True, cwd=REPO, env=ENV, capture_output=True, timeout=600)
    _assert_same_weights(tmp_path / "full" / "model.pt", tmp_path / "cut" / "model.pt")


# --------------------------------------------------------------------------------- one writer per folder

HOLD = "import sys, time; from fastrsb.lock import OutputLock; OutputLock(sys.argv[1], sys.argv[2]).acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def test_a_second_writer_is_refused_with_one_line_and_a_killed_holder_releases(demo_data, tmp_path):
    src = demo_data.parent / "src"
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "convert"], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_bytes(out)
        for argv in (["convert", str(src), str(out), "--format", "dali", "--no-progress"],
                     _train_argv(src, out)[3:],
                     ["sweep", "--data", str(src), "--out", str(out), "--seeds", "1-2", "--loader", "pil"]):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "fastrsb", *argv], cwd=REPO, env=ENV, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert f"{out} is in use by another fastrsb convert (pid {holder.pid} on " in lines[0], lines[0]
            assert "since 20" in lines[0] and "wait for it to finish or stop it" in lines[0], lines[0]
            assert time.perf_counter() - t0 < 60  # refused at once, not after a scan or a model build
            assert tree_bytes(out) == before  # nothing written, nothing lost
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the next run takes it over and works
    with OutputLock(out, "test") as lock:
        assert lock.held and json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUse, match="in use by another fastrsb test"):
            OutputLock(out, "convert").acquire()
    assert (out / LOCK_NAME).read_text() == ""  # released: emptied, left in place
    assert fastrsb_main(["convert", str(src), str(out), "--format", "dali", "--no-progress", "--workers", "1"]) == 0


# ------------------------------------------------------------------------------------- a killed rank

def _rank_env(rank: int, port: int) -> dict:
    return dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                LOCAL_RANK=str(rank))


def _launch_two(argv, port, **popen):
    return [subprocess.Popen(argv, cwd=REPO, env=_rank_env(r, port), **popen) for r in range(2)]


def _ddp_argv(src, out):
    return _train_argv(src, out, "--auto-resume", "--dist-timeout", "60", epochs=3, global_batch=16)


@pytest.fixture(scope="module")
def ddp_full(demo_data, tmp_path_factory):
    """A pair of gloo processes never interrupted: 7 steps per epoch, 3 epochs."""
    out = tmp_path_factory.mktemp("ddp") / "full"
    for proc in _launch_two(_ddp_argv(demo_data.parent / "src", out), _free_port(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL):
        assert proc.wait(timeout=600) == 0
    return out


def test_sigterm_to_one_rank_stops_both_after_the_same_step(demo_data, ddp_full, tmp_path):
    """The signal reaches rank 1 only; both ranks agree at a step boundary, stop after the same step
    with one checkpoint and exit 75; relaunched, the pair ends as the pair never stopped."""
    cut = tmp_path / "cut"
    procs = _launch_two(_ddp_argv(demo_data.parent / "src", cut), _free_port(), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _steps_logged(cut) >= 9, procs[0], timeout=300)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [75, 75], outs
    assert "SIGTERM received" in outs[1][1] and "SIGTERM received" not in outs[0][1]
    ckpt = _state(cut / "checkpoint.pt")
    assert ckpt["step"] > 9 and len(ckpt["rng"]) == 2
    for proc in _launch_two(_ddp_argv(demo_data.parent / "src", cut), _free_port(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL):
        assert proc.wait(timeout=600) == 0
    _assert_same_weights(ddp_full / "model.pt", cut / "model.pt")


def test_a_killed_rank_never_hangs_the_other_and_a_relaunch_resumes(demo_data, ddp_full, tmp_path):
    """2 gloo processes: rank 1 is killed mid-epoch after the first checkpoint; rank 0 stops within a
    bounded time with a message naming the checkpoint; relaunched with --auto-resume (the same command
    for every launch), the pair ends with the weights of a pair never interrupted."""
    src = demo_data.parent / "src"
    cut = tmp_path / "cut"
    procs = _launch_two(_ddp_argv(src, cut), _free_port(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (cut / "checkpoint.pt").exists() and _steps_logged(cut) >= 9, procs[0], timeout=300)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.perf_counter()
        _, err = procs[0].communicate(timeout=120)
        took = time.perf_counter() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert took < 90, took
    assert procs[0].returncode == 2, err
    assert "lost contact with the others" in err and f"the last checkpoint is {cut / 'checkpoint.pt'}" in err, err
    assert "--resume" in err and "Traceback" not in err, err
    assert "Aborted" not in err and "terminate called" not in err, err
    for proc in _launch_two(_ddp_argv(src, cut), _free_port(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        assert proc.wait(timeout=600) == 0
    _assert_same_weights(ddp_full / "model.pt", cut / "model.pt")


def test_sigterm_to_a_sweep_reaches_its_run_and_the_same_command_resumes(demo_data, tmp_path):
    """The sweep passes the signal to the run in progress, which checkpoints and stops; no later seed
    starts; the sweep exits 75, and the same command finishes every seed."""
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "fastrsb", "sweep", "--recipe", "a3", "--seeds", "1-2", "--data",
            str(demo_data.parent / "src"), "--loader", "pil", "--model", "test_resnet", "--out", str(out),
            "--batch-per-gpu", "8", "--device", "cpu", "--parallel", "sequential", "epochs=4", "train_res=32",
            "test_res=32", "global_batch=8", "warmup_epochs=1"]
    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for((out / "seed-1" / "checkpoint.pt").exists, proc, timeout=300), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, (stdout, stderr)
    assert "stopped by SIGTERM" in stderr and "seeds [1] checkpointed" in stderr, stderr
    assert not (out / "seed-2").exists()
    assert not (out / "seed-1" / "model.pt").exists() and "SIGTERM received" in (out / "seed-1" / "train.out").read_text()
    again = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads((out / "sweep.json").read_text())["runs"]) == ["1", "2"]
