"""`fastrsb bench scale` on a tiny synthetic ImageNet: the sources it generates, and what it reports."""
import json
import os
import tarfile
from pathlib import Path

import pytest

from fastrsb.bench import scale
from fastrsb.cli import main

pytestmark = pytest.mark.timeout(600)


def test_generated_sources_are_imagenet_shaped(tmp_path):
    sources = scale.make_sources(tmp_path, [30, 75], val=20, classes=4, workers=2, log=lambda *a: None)
    small, full = sources[30], sources[75]
    assert (small["train"], small["val"], full["train"], full["val"]) == (30, 8, 75, 20)
    for src in (small, full):
        train = src["imagefolder"] / "train"
        counts = sorted(len(os.listdir(train / d)) for d in os.listdir(train))
        assert sum(counts) == src["train"] and counts[-1] - counts[0] <= 1
        val = sorted(p.name for p in (src["imagefolder"] / "val").rglob("*.JPEG"))
        assert val == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, src["val"] + 1)]
        with tarfile.open(src["official"] / scale.TRAIN_TAR) as tar:
            assert sorted(m.name for m in tar) == [f"{scale.wnid(c)}.tar" for c in range(4)]
        with tarfile.open(src["official"] / scale.VAL_TAR) as tar:
            assert sorted(m.name for m in tar) == val
    # the smaller size is a prefix of every class, made of hard links to the larger one's files
    first = next((small["imagefolder"] / "train" / scale.wnid(0)).iterdir())
    assert first.stat().st_nlink == 2
    assert first.read_bytes() == (full["imagefolder"] / "train" / scale.wnid(0) / first.name).read_bytes()
    # generated once: a second call reuses them
    stamp = first.stat().st_mtime_ns
    scale.make_sources(tmp_path, [30, 75], val=20, classes=4, workers=2, log=lambda *a: None)
    assert first.stat().st_mtime_ns == stamp


def test_bench_scale_reports_each_run_and_checks_both_layouts_agree(tmp_path):
    out = tmp_path / "scale.jsonl"
    assert main(["bench", "scale", "--work", str(tmp_path / "work"), "--sizes", "24,60", "--val", "12",
                 "--classes", "3", "--runs", "imagefolder,official,ffcv", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["config"]["train"], r["config"]["run"]) for r in records] == [
        (24, "imagefolder"), (24, "official"), (24, "ffcv"), (60, "imagefolder"), (60, "official"), (60, "ffcv")]
    for r in records:
        assert r["benchmark"] == "scale" and r["unit"] == "img/s/core"
        assert r["images"] == r["config"]["train"] + r["config"]["val"]
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_pss_mib"] > 0 and r["max_rss_mib"] > 0
        assert r["value"] == pytest.approx(1e6 / r["us_per_sample"] / os.cpu_count(), rel=0.01)
        assert r["stages"] and all(len(s) == 2 for s in r["stages"])
    assert all(r["growth_vs_smallest"] == 1.0 for r in records[:3])
    small, large = records[0], records[3]
    assert large["growth_vs_smallest"] == pytest.approx(large["us_per_sample"] / small["us_per_sample"], rel=0.01)
    assert [r.get("same_files_as_imagefolder") for r in records if r["config"]["run"] == "official"] == [True, True]
    assert not any(Path(tmp_path / "work").glob("out-*"))  # outputs are removed, sources kept
    assert (tmp_path / "work" / "src-60" / "official" / scale.DEVKIT).is_file()


def test_drop_caches_without_permission_names_the_fix(monkeypatch):
    import builtins

    from fastrsb.errors import FastRSBError

    real_open = builtins.open

    def refusing(path, *args, **kwargs):
        if str(path) == "/proc/sys/vm/drop_caches":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "sync", lambda: None)
    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(FastRSBError, match=r"--drop-caches: cannot write /proc/sys/vm/drop_caches \(Permission denied\)"
                                           r"; run as root on Linux, or leave --drop-caches out"):
        scale.drop_caches()
