"""Fault injection on `fastrsb convert` and `verify` (CPU, small): kill -9, Ctrl-C, a full disk, a dead
worker, damaged shards, beton and manifest. Each test checks that nothing already written is lost and
that the re-run ends byte-identical to an uninterrupted conversion."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli, tree_bytes, wait_for
from fastrsb.demo_data import make_demo_data
from fastrsb.lock import LOCK_NAME
from fastrsb.loaders import layout

pytestmark = pytest.mark.timeout(600)

ARGS = ["--shard-size", "20", "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Large enough (240 images, 160-320 px) that a conversion lasts a few seconds on 2 cores."""
    src = tmp_path_factory.mktemp("faults") / "src"
    make_demo_data(src, num_classes=4, train_per_class=50, val_per_class=10, min_size=160, max_size=320, seed=7)
    return src


@pytest.fixture(scope="module")
def reference(source) -> dict:
    out = source.parent / "reference"
    run_cli("convert", source, out, *ARGS)
    return tree_bytes(out)


def start(source: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastrsb", "convert", str(source), str(out), *ARGS], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def finish(proc: subprocess.Popen, what: str, timeout=60) -> str:
    """stderr of a run that must end by itself; a hang fails with the stacks of every thread."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)  # faulthandler prints the stacks
        pytest.fail(f"{what}: still running after {timeout} s:\n{proc.communicate()[1][:5000]}")




def finished_files(out: Path) -> dict:
    """Files a conversion has finished (no temporary names): these must survive any fault."""
    # the lock names its holder while a run is in progress and is emptied when it ends (fastrsb/lock.py)
    return {k: v for k, v in tree_bytes(out).items() if not k.endswith((".tmp", LOCK_NAME)) and "state" not in k}


STAGES = {  # each names the files whose appearance marks the stage (a new one: earlier runs left some)
    "train shard written": lambda out: set(layout.wds_dir(out, "train").glob("*.json")),
    "train beton being written": lambda out: set(layout.split_dir(out, "train").glob("*.beton.tmp")),
    "train manifest written": lambda out: set(layout.split_dir(out, "train").glob("manifest.json")),
    "val shard written": lambda out: set(layout.wds_dir(out, "val").glob("*.json")),
}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupts_resume_byte_identical(sig, source, reference, tmp_path):
    out = tmp_path / "out"
    hits = 0
    for name, stage in STAGES.items():
        before = stage(out)
        proc = start(source, out)
        if wait_for(lambda: stage(out) - before, proc):
            kept = finished_files(out)
            os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C does
            t0 = time.time()
            err = finish(proc, f"{name}: {sig!r}")
            assert time.time() - t0 < 30, f"{name}: took {time.time() - t0:.0f} s to stop"
            hits += 1
            if sig == signal.SIGINT:
                assert proc.returncode == 130, (name, err)
                assert str(out) in err and "run the same fastrsb convert again" in err, err
            now = finished_files(out)
            assert all(now.get(k) == v for k, v in kept.items() if "manifest" not in k), f"{name}: lost a file"
        else:
            finish(proc, name)
    assert hits >= 2, "the conversion finished before the faults could be injected"
    run_cli("convert", source, out, *ARGS)
    assert tree_bytes(out) == reference


def _worker_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_dead_worker_ends_the_run_with_a_message(source, reference, tmp_path):
    out = tmp_path / "out"
    proc = start(source, out)
    assert wait_for(lambda: len(_worker_pids(proc.pid)) >= 2 and any(layout.wds_dir(out, "train").glob("*.json")),
                    proc), "no worker processes seen"
    os.kill(_worker_pids(proc.pid)[0], signal.SIGKILL)  # as the OOM killer would
    err = finish(proc, "after a worker was killed")
    assert proc.returncode == 2 and "worker process died" in err and "run the same fastrsb convert again" in err, err
    run_cli("convert", source, out, *ARGS)
    assert tree_bytes(out) == reference


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this machine refuses to mount a tmpfs: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("size", ["2m", "12m"], ids=["full-during-shards", "full-during-beton"])
def test_disk_full_stops_promptly_and_resumes(size, tiny_disk, source, reference):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(tiny_disk)], check=True)
    out = tiny_disk / "out"
    t0 = time.time()
    proc = run_cli("convert", source, out, *ARGS, check=False, timeout=120)
    assert time.time() - t0 < 60
    assert proc.returncode == 2, proc.stderr
    assert f"{out}: no space left on the device" in proc.stderr and "run the same fastrsb convert again" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.rglob("*.tar.tmp")), "a partial shard was left behind"
    kept = finished_files(out)
    subprocess.run(["mount", "-o", "remount,size=200m", str(tiny_disk)], check=True)
    run_cli("convert", source, out, *ARGS)
    now = tree_bytes(out)
    assert all(now[k] == v for k, v in kept.items() if "manifest" not in k and "samples" not in k)
    assert now == reference


def flip_byte(path: Path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("targets", [("train shard", "val manifest"), ("train beton",)])
def test_damage_is_named_and_the_fix_restores_the_bytes(targets, source, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(source.parent / "reference", out)
    damaged = []
    for target in targets:
        if target == "train shard":
            damaged.append(layout.wds_shards(out, "train")[1])
            flip_byte(damaged[-1], 2000)
        elif target == "train beton":
            damaged.append(layout.beton_path(out, "train"))
            flip_byte(damaged[-1], damaged[-1].stat().st_size - 100)
        else:
            damaged.append(layout.manifest_path(out, "val"))
            manifest = json.loads(damaged[-1].read_text())
            manifest["num_rejected"] = 0 if manifest["num_rejected"] else 1
            damaged[-1].write_text(json.dumps(manifest, indent=1))
    proc = run_cli("verify", out, "--quick", check=False)
    assert proc.returncode == 1
    lines = [m for m in proc.stdout.splitlines() if m.startswith("DAMAGED")]
    assert len(lines) == len(targets), proc.stdout
    for path, line in zip(damaged, lines):
        assert str(path) in line, proc.stdout
    # follow the advice: delete each damaged file (and a shard's record), convert again
    for path in damaged:
        path.unlink()
        if path.suffix == ".tar":
            path.with_suffix(".json").unlink()
    run_cli("convert", source, out, *ARGS)
    assert tree_bytes(out) == reference
