"""Recipes pinned to ../shared/RECIPES.md (RSB Table 1), and the command line."""
import dataclasses
import json

import pytest

from conftest import run_cli
from fastrsb.recipes import A1, A2, A3, get_recipe, override

# (A1, A2, A3) per row of RSB Table 1, plus timm's public BCE threshold
TABLE = {
    "epochs": (600, 300, 100),
    "train_res": (224, 224, 160),
    "test_res": (224, 224, 224),
    "test_crop_pct": (0.95, 0.95, 0.95),
    "global_batch": (2048, 2048, 2048),
    "optimizer": ("lamb", "lamb", "lamb"),
    "lr": (5e-3, 5e-3, 8e-3),
    "weight_decay": (0.01, 0.02, 0.02),
    "warmup_epochs": (5, 5, 5),
    "schedule": ("cosine", "cosine", "cosine"),
    "loss": ("bce", "bce", "bce"),
    "bce_target_thresh": (0.2, 0.2, 0.2),
    "label_smoothing": (0.1, 0.0, 0.0),
    "drop_path_rate": (0.05, 0.05, 0.0),
    "aug_repeats": (3, 3, 0),
    "rand_augment": ("rand-m7-mstd0.5-inc1", "rand-m7-mstd0.5-inc1", "rand-m6-mstd0.5-inc1"),
    "mixup_alpha": (0.2, 0.1, 0.1),
    "cutmix_alpha": (1.0, 1.0, 1.0),
    "dropout": (0.0, 0.0, 0.0),
    "grad_clip": (0.0, 0.0, 0.0),
    "ema_decay": (0.0, 0.0, 0.0),
    "hflip": (0.5, 0.5, 0.5),
    "rrc_scale": ((0.08, 1.0),) * 3,
    "mixed_precision": (True, True, True),
    "interpolation": ("random",) * 3,  # timm's train default: bilinear or bicubic per image
    "progressive_res": ((0, 0),) * 3,  # off: RSB trains at one resolution
    "progressive_epochs": ((0, 0),) * 3,
    "paper_top1": (80.4, 79.8, 78.1),
}


@pytest.mark.parametrize("key", sorted(TABLE))
def test_recipes_match_the_paper(key):
    for recipe, expected in zip((A1, A2, A3), TABLE[key]):
        assert getattr(recipe, key) == expected, (recipe.name, key)


def test_every_recipe_field_is_pinned():
    pinned = set(TABLE) | {"name", "model", "mixup_prob", "mixup_switch_prob", "rrc_ratio"}
    assert {f.name for f in dataclasses.fields(A2)} == pinned
    assert A2.rrc_ratio == pytest.approx((3 / 4, 4 / 3)) and A2.mixup_prob == 1.0 and A2.mixup_switch_prob == 0.5


def test_recipes_are_frozen_and_overrides_are_typed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        A3.epochs = 1
    r = override(A3, ["epochs=10", "lr=0.001", "mixed_precision=false", "rrc_scale=0.25,1"])
    assert (r.epochs, r.lr, r.mixed_precision, r.rrc_scale) == (10, 0.001, False, (0.25, 1.0))
    assert A3.epochs == 100
    with pytest.raises(ValueError, match="unknown recipe key 'epoch'"):
        override(A3, ["epoch=10"])
    with pytest.raises(ValueError, match="expects int"):
        override(A3, ["epochs=ten"])
    with pytest.raises(ValueError, match="key=value"):
        override(A3, ["epochs"])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("a4")


@pytest.mark.parametrize("item, field", [
    ("epochs=0", "epochs"), ("epochs=-1", "epochs"), ("lr=nan", "lr"), ("lr=-1", "lr"), ("lr=inf", "lr"),
    ("rand_augment=garbage", "rand_augment"), ("hflip=1.5", "hflip"), ("rrc_scale=0.5,0.1", "rrc_scale"),
    ("schedule=step", "schedule"), ("optimizer=sgd", "optimizer"), ("interpolation=area", "interpolation"),
    ("progressive_res=128,192", "progressive_res")])
def test_overrides_that_cannot_train_are_errors_naming_the_field(item, field):
    from fastrsb.errors import FastRSBError

    with pytest.raises(FastRSBError, match=f"{field}="):
        override(A3, [item])


def test_removed_fields_are_unknown_keys():
    """RSB sets neither random erasing nor colour jitter; fields nothing would read are refused."""
    for item in ("random_erasing=0.25", "color_jitter=0.4"):
        with pytest.raises(ValueError, match="unknown recipe key"):
            override(A3, [item])


def test_cli_help_for_every_subcommand():
    top = run_cli("--help").stdout
    commands = [c for c in ("demo-data", "recipe", "convert", "verify") if c in top]
    assert commands == ["demo-data", "recipe", "convert", "verify"]
    for command in commands:
        assert "usage: fastrsb " + command in run_cli(command, "--help").stdout


def test_cli_recipe_prints_json():
    data = json.loads(run_cli("recipe", "a3", "epochs=5").stdout)
    assert data["name"] == "a3" and data["epochs"] == 5 and data["lr"] == 8e-3


def test_demo_data_cli_writes_imagefolder(tmp_path):
    run_cli("demo-data", tmp_path / "d", "--classes", 3, "--train-per-class", 4, "--val-per-class", 2,
            "--max-size", 64, "--min-size", 32)
    for split, n in (("train", 4), ("val", 2)):
        folders = sorted((tmp_path / "d" / split).iterdir())
        assert len(folders) == 3 and all(len(list(f.iterdir())) == n for f in folders)


def test_the_command_line_makes_openmp_threads_sleep_when_they_wait(tmp_path):
    """`fastrsb ...` sets OMP_WAIT_POLICY=PASSIVE before torch loads (spinning teams stall when a loader's
    workers hold the cores), and leaves a value the user set alone."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    probe = ("import os, sys; from fastrsb import cli; sys.argv = ['fastrsb', 'recipe', 'a3']; cli.main(); "
             "import torch; print('policy', os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0 and "policy PASSIVE" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.returncode == 0 and "policy ACTIVE" in out.stdout, out.stderr[-2000:]


def test_the_command_line_keeps_freed_batches_for_reuse():
    """glibc takes the heap settings that keep a freed batch-sized block for the next batch: touching a
    100 MiB block that was freed and asked for again costs no page faults (by default glibc unmaps it,
    and each of its 25,600 pages faults again)."""
    import platform
    import subprocess
    import sys

    from conftest import REPO

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    probe = ("import ctypes, resource, sys; from fastrsb import cli; "
             "print('set', cli._keep_freed_memory() if sys.argv[1] == 'set' else None); "
             "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; "
             "libc.free.argtypes = [ctypes.c_void_p]; size = 100 << 20; a = libc.malloc(size); "
             "ctypes.memset(a, 1, size); libc.free(a); b = libc.malloc(size); "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; ctypes.memset(b, 2, size); "
             "print('faults', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, cwd=REPO,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout, int(out.stdout.split("faults")[1])

    stdout, kept = faults("set")
    assert "set True" in stdout and kept < 1000
    assert faults("default")[1] > 20000
