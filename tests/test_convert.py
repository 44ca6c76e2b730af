"""Conversion: oddities, round trips through the real FFCV Loader and DALI reader, determinism, resume, errors."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from fastrsb.convert import convert
from fastrsb.demo_data import KEPT_ODDITIES, make_demo_data
from fastrsb.errors import FastRSBError
from fastrsb.images import decode_jpeg, load_rgb
from fastrsb.loaders import layout, wds

pytestmark = pytest.mark.timeout(600)

# Demo images carry Gaussian noise (sigma ~10 grey levels) that JPEG quality 90 smooths away: measured
# mean abs error against the source, after the same centre crop and INTER_AREA resize, 2.1 on average
# and 5.2 at most over the odd dataset. Between the beton's decode and OpenCV's decode of the shard's
# JPEG it is ~1.0 (decoder and resize rounding), so the beton holds the same picture as the shard.
MEAN_ABS_TOL = 6.0
SAME_JPEG_TOL = 1.5


def source_labels(root: Path, split: str) -> Counter:
    """Label multiset of the decodable images of a source split, found independently of the converter."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    counts = Counter()
    for label, name in enumerate(classes):
        for f in (root / split / name).iterdir():
            try:
                with Image.open(f) as img:
                    img.load()
            except Exception:
                continue
            counts[label] += 1
    return counts


def tsv(out: Path, split: str) -> list[dict]:
    return layout.read_samples(layout.samples_path(out, split))


def test_oddities_are_kept_rejected_or_named(converted, odd_dataset):
    manifest = json.loads((converted / "train" / "manifest.json").read_text())
    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    non_images = {Path(r["path"]).name: r["reason"] for r in manifest["non_images"]}
    assert set(rejected) == {"odd_truncated.JPEG", "odd_empty.JPEG"}
    assert "truncated" in rejected["odd_truncated.JPEG"] and "0 bytes" in rejected["odd_empty.JPEG"]
    assert set(non_images) == {"odd_notes.txt"}
    rows = {Path(r["source"]).name: r for r in tsv(converted, "train")}
    for name in KEPT_ODDITIES:
        assert name in rows, f"{name} was dropped"
    # nothing else dropped: every file is written, rejected or named
    n_files = sum(1 for p in (odd_dataset / "train").rglob("*") if p.is_file())
    assert manifest["num_samples"] + len(rejected) + len(non_images) == n_files == manifest["num_files_scanned"]
    # EXIF orientation 6 on a stored 200x150 image: shown as 150 wide, 200 high
    exif = rows["odd_exif_rotated.JPEG"]
    assert (int(exif["width"]), int(exif["height"])) == (150, 200)
    # the 6000x4500 image is bounded to the default max side 500
    large = rows["odd_large.JPEG"]
    assert (int(large["width"]), int(large["height"])) == (500, 375)
    assert all(max(int(r["width"]), int(r["height"])) <= 500 for r in rows.values())
    assert json.loads((converted / "classes.json").read_text()) == sorted(p.name for p in (odd_dataset / "train").iterdir())


def test_label_counts_match_source(converted, odd_dataset):
    for split in ("train", "val"):
        manifest = json.loads((converted / split / "manifest.json").read_text())
        counts = Counter(int(r["label"]) for r in tsv(converted, split))
        assert counts == source_labels(odd_dataset, split)
        assert list(manifest["counts_per_class"].values()) == [counts[i] for i in range(manifest["num_classes"])]


def center_crop_resize(rgb: np.ndarray, side: int) -> np.ndarray:
    """FFCV's CenterCropRGBImageDecoder(ratio=1) on the reference: centre square, INTER_AREA resize."""
    import cv2

    h, w = rgb.shape[:2]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    return cv2.resize(rgb[top : top + c, left : left + c], (side, side), interpolation=cv2.INTER_AREA)


def test_ffcv_roundtrip_pixels_and_labels(converted, odd_dataset):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    rows = tsv(converted, "train")
    loader = Loader(str(converted / "train" / "train.beton"), batch_size=8, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((48, 48), ratio=1.0)],
                               "label": [IntDecoder(), ToTensor()]})
    # FFCV reuses its output buffers from batch to batch: copy before keeping
    images, labels = zip(*[(np.asarray(i).copy(), np.asarray(l).copy().reshape(-1)) for i, l in loader])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert len(images) == len(rows)
    assert labels.tolist() == [int(r["label"]) for r in rows]
    index = {}
    for tar in (converted / "train" / "wds").glob("*.tar"):
        for members in wds.read_index(tar.with_suffix(".idx")):
            index[members["jpg"].key] = (tar, members["jpg"])
    for image, row in zip(images, rows):
        reference = center_crop_resize(load_rgb(odd_dataset / "train" / row["source"], 500), 48)
        err = np.abs(image.astype(np.float32) - reference).mean()
        assert err < MEAN_ABS_TOL, (row["source"], err)
        shard_jpeg = center_crop_resize(decode_jpeg(wds.read_member(*index[row["key"]])), 48)
        assert np.abs(image.astype(np.float32) - shard_jpeg).mean() < SAME_JPEG_TOL, row["source"]


def test_dali_roundtrip_pixels_and_labels(converted, odd_dataset):
    from nvidia.dali import fn, pipeline_def

    rows = tsv(converted, "train")
    manifest = json.loads((converted / "train" / "manifest.json").read_text())
    tars = [str(converted / "train" / s["file"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                         ext=["jpg", "cls"], random_shuffle=False, name="r")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.epoch_size("r") == len(rows)
    for row in rows:
        images, cls = p.run()
        image = np.asarray(images[0])
        assert int(bytes(np.asarray(cls[0])).decode()) == int(row["label"])
        source = odd_dataset / "train" / row["source"]
        reference = load_rgb(source, 500)
        assert image.shape == reference.shape, row["source"]
        err = np.abs(center_crop_resize(image, 48).astype(np.float32) - center_crop_resize(reference, 48)).mean()
        assert err < MEAN_ABS_TOL, (row["source"], err)


def test_shard_index_equals_dalis_wds2idx(converted, tmp_path):
    import wds2idx

    tars = sorted((converted / "train" / "wds").glob("*.tar"))
    assert len(tars) >= 3
    for tar in tars:
        reference = tmp_path / (tar.stem + ".idx")
        creator = wds2idx.IndexCreator(str(tar), str(reference), verbose=False)
        creator.create_index()
        creator.close()
        assert reference.read_text() == tar.with_suffix(".idx").read_text()
        assert len(wds.read_index(tar.with_suffix(".idx"))) > 0


def test_train_shards_mix_classes(converted):
    labels = [int(r["label"]) for r in tsv(converted, "train")]
    first_shard = labels[:10]
    assert len(set(first_shard)) > 1, "train split must be shuffled so shards mix classes"
    val = [int(r["label"]) for r in tsv(converted, "val")]
    assert val == sorted(val)


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_across_worker_counts(converted, odd_dataset, tmp_path):
    out = tmp_path / "again"
    convert(odd_dataset, out, shard_size=10, workers=1, progress=False, log=lambda *a: None)
    assert tree_bytes(out) == tree_bytes(converted)


def _wait_for(predicate, proc, timeout=120.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def test_kill_and_resume_gives_the_same_bytes(odd_dataset, converted, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastrsb", "convert", str(odd_dataset), str(out),
           "--shard-size", "10", "--workers", "2", "--no-progress"]
    # kill 1: after the first shard is complete; kill 2: while the beton is being written
    stages = [lambda: any((out / "train" / "wds").glob("*.json")),
              lambda: (out / "train" / "train.beton.tmp").exists()]
    killed = 0
    for stage in stages:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if _wait_for(stage, proc):
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 1
    assert not (out / "train" / "manifest.json").exists() or killed < 2
    run_cli("convert", odd_dataset, out, "--shard-size", 10, "--workers", 2, "--no-progress")
    assert tree_bytes(out) == tree_bytes(converted)


def test_leftover_temporary_files_are_replaced(odd_dataset, converted, tmp_path):
    out = tmp_path / "leftover"
    (out / "train" / "wds").mkdir(parents=True)
    convert(odd_dataset, out, shard_size=10, workers=2, progress=False, log=lambda *a: None)
    # simulate a crash mid-shard and mid-beton: garbage under temporary names, final files gone
    (out / "train" / "train.beton").rename(out / "train" / "train.beton.tmp")
    (out / "train" / "manifest.json").unlink()
    shard = next((out / "train" / "wds").glob("*.tar"))
    shard.with_suffix(".tar.tmp").write_bytes(b"partial")
    shard.unlink()
    convert(odd_dataset, out, shard_size=10, workers=2, progress=False, log=lambda *a: None)
    assert tree_bytes(out) == tree_bytes(converted)


def test_other_options_into_same_out_is_refused(odd_dataset, tmp_path):
    out = tmp_path / "o"
    convert(odd_dataset, out, formats=["dali"], shard_size=10, workers=1, progress=False, log=lambda *a: None)
    with pytest.raises(FastRSBError, match="other options"):
        convert(odd_dataset, out, formats=["dali"], quality=80, shard_size=10, workers=1, progress=False,
                log=lambda *a: None)


def test_beton_only_and_write_modes(odd_dataset, tmp_path):
    from fastrsb.loaders.beton import store_as_jpeg

    out = tmp_path / "raw"
    convert(odd_dataset / "val", out, formats=["beton"], split="val", write_mode="proportion",
            compress_probability=0.5, max_side=64, workers=1, progress=False, log=lambda *a: None)
    assert (out / "val" / "val.beton").exists() and not (out / "val" / "wds").exists()
    manifest = json.loads((out / "val" / "manifest.json").read_text())
    assert manifest["formats"] == ["beton"] and manifest["shards"] == []
    share = np.mean([store_as_jpeg(i, "proportion", 0.5) for i in range(2000)])
    assert 0.45 < share < 0.55


def test_verify_passes_then_names_a_damaged_file(converted, tmp_path):
    import shutil

    proc = run_cli("verify", converted)
    assert "verify: OK" in proc.stdout
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    shard = sorted((damaged / "train" / "wds").glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("verify", damaged, "--quick", check=False)
    assert proc.returncode != 0
    assert str(shard) in proc.stdout and "DAMAGED" in proc.stdout


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "no such folder"),
        ("empty_root", "no train/ or val/"),
        ("no_classes", "no class folders inside"),
        ("flat_classes", "pass --split train"),
        ("empty_class", "empty class folder"),
        ("out_not_writable", "cannot write there"),
        ("bad_format", "unknown format tfrecord"),
    ],
)
def test_clear_errors(setup, match, tmp_path):
    src, out, formats = tmp_path / "src", tmp_path / "out", ["beton", "dali"]
    if setup == "missing":
        src = tmp_path / "nope"
    elif setup == "empty_root":
        src.mkdir()
    elif setup == "no_classes":
        (src / "train").mkdir(parents=True)
    elif setup == "flat_classes":
        (src / "cat").mkdir(parents=True)
    elif setup == "empty_class":
        make_demo_data(src, num_classes=2, train_per_class=2, val_per_class=1, max_size=32, min_size=16)
        (src / "train" / "n99999999").mkdir()
    elif setup == "out_not_writable":
        make_demo_data(src, num_classes=2, train_per_class=2, val_per_class=1, max_size=32, min_size=16)
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "out"
    elif setup == "bad_format":
        formats = ["tfrecord"]
    with pytest.raises(FastRSBError, match=match):
        convert(src, out, formats=formats, workers=1, progress=False, log=lambda *a: None)


def test_missing_extra_names_the_install(odd_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv now raises ImportError
    with pytest.raises(FastRSBError, match=r"fastrsb\[ffcv\]"):
        convert(odd_dataset, tmp_path / "o", formats=["beton"], workers=1, progress=False, log=lambda *a: None)


def test_cli_error_exit_code_and_message(tmp_path):
    proc = run_cli("convert", tmp_path / "nope", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "Traceback" not in proc.stderr
