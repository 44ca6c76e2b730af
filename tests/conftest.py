import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def record_devices():
    """A TorchDispatchMode that records each op's name and the device types of the tensors it touches, as
    (name, {device types}) in `.ops` (used with fake CUDA tensors to trace GPU-only code on the CPU)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordDevices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            self.ops.append((str(func.overloadpacket), {t.device.type for t in tensors}))
            return func(*args, **(kwargs or {}))

    return RecordDevices()


def run_cli(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m fastrsb ARGS` in a subprocess (FFCV and DALI keep threads; a fresh process is safest)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastrsb", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fastrsb {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def odd_dataset(tmp_path_factory) -> Path:
    """A small demo ImageFolder dataset with every oddity, shared by the whole test session."""
    from fastrsb.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("odd") / "src"
    make_demo_data(root, num_classes=4, train_per_class=12, val_per_class=4, min_size=64, max_size=160,
                   oddities=True, large_side=6000, seed=1)
    return root


@pytest.fixture(scope="session")
def converted(odd_dataset, tmp_path_factory) -> Path:
    """odd_dataset converted to both formats (small shards, so there are several)."""
    out = tmp_path_factory.mktemp("conv") / "out"
    run_cli("convert", odd_dataset, out, "--shard-size", 10, "--workers", 2, "--no-progress")
    return out


@pytest.fixture
def one_thread():
    """On this shared 2-core machine, 2 OpenMP threads run a tiny model 20x slower than 1 (spin-waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tree_bytes(root: Path) -> dict:
    """Every file under root, by relative path: for byte-identical comparisons of conversions."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(predicate, proc, timeout=120.0) -> bool:
    """Poll `predicate` until it holds (True), or `proc` ends or the time runs out (False)."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (benchmarks/gpu_suite.sh runs `pytest -m cuda`)")


def pytest_collection_modifyitems(config, items):
    """Tests skipped without CUDA are the CUDA tests: mark them, so a GPU box can run just those."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if "CUDA" in str(mark.kwargs.get("reason", "")):
                item.add_marker(pytest.mark.cuda)
