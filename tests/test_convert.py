"""Conversion: oddities, round trips through the real FFCV Loader and DALI reader, determinism, resume, errors."""
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli, tree_bytes, wait_for
from fastrsb.convert import convert, file_sha256
from fastrsb.demo_data import KEPT_ODDITIES, make_demo_data
from fastrsb.errors import FastRSBError
from fastrsb.images import decode_jpeg, load_rgb
from fastrsb.loaders import layout, wds
from fastrsb.verify import verify

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


def test_deterministic_across_worker_counts(converted, odd_dataset, tmp_path):
    out = tmp_path / "again"
    convert(odd_dataset, out, shard_size=10, workers=1, progress=False, log=lambda *a: None)
    assert tree_bytes(out) == tree_bytes(converted)




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
        if wait_for(stage, proc):
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


# ------------------------------------------------------------------ hostile inputs (issue 12)

def quiet(*_):
    pass


def small_source(root: Path, train=3, val=2) -> Path:
    make_demo_data(root, num_classes=2, train_per_class=train, val_per_class=val, max_size=48, min_size=32, seed=3)
    return root


def first_class(src: Path, split="train") -> Path:
    return sorted(p for p in (src / split).iterdir() if p.is_dir())[0]


def some_jpeg(src: Path) -> bytes:
    return next(first_class(src).glob("*.JPEG")).read_bytes()


ODD_NAMES = [b"new\nline.JPEG", b"tab\there.JPEG", b"latin1-\xe9\xff.JPEG", b"-leading-dash.JPEG",
             b"x" * 245 + b".JPEG"]


def test_any_file_name_survives(tmp_path):
    src = small_source(tmp_path / "src")
    folder, jpeg = os.fsencode(first_class(src)), some_jpeg(src)
    for name in ODD_NAMES:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(jpeg)
    out = tmp_path / "out"
    convert(src, out, formats=["dali"], workers=1, progress=False, log=quiet)
    rows = layout.read_samples(layout.samples_path(out, "train"))
    stored = {os.path.basename(os.fsencode(r["source"])) for r in rows}
    for name in ODD_NAMES:
        assert name in stored, name
    index = layout.ShardIndex.load(out, "train")  # the loaders' reader of the same table
    assert len(index) == len(rows)
    assert verify(out, decode=False, log=quiet)
    # a second run finds everything done instead of seeing other files
    logs = []
    convert(src, out, formats=["dali"], workers=1, progress=False, log=logs.append)
    assert any("nothing to do" in m for m in logs)


def test_old_layout_is_refused_with_the_fix(converted, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(converted, old)
    layout.samples_path(old, "train").rename(old / "train" / "samples.tsv")
    with pytest.raises(FastRSBError, match="older fastrsb.*re-run fastrsb convert"):
        layout.ShardIndex.load(old, "train")
    with pytest.raises(FastRSBError, match="re-run fastrsb convert"):
        layout.read_classes(old)


def test_split_flag_on_a_root_with_splits_is_an_error(tmp_path):
    src = small_source(tmp_path / "src")
    with pytest.raises(FastRSBError, match="--split train: .* holds train/ and val/"):
        convert(src, tmp_path / "out", split="train", workers=1, progress=False, log=quiet)
    assert not (tmp_path / "out").exists()


def test_out_inside_a_split_is_refused(tmp_path):
    src = small_source(tmp_path / "src")
    with pytest.raises(FastRSBError, match="lies inside the train split"):
        convert(src / "train", src / "train" / "out", split="train", workers=1, progress=False, log=quiet)
    with pytest.raises(FastRSBError, match="lies inside OUT"):
        convert(src, src, workers=1, progress=False, log=quiet)
    assert not (src / "train" / "out").exists() and not (src / "classes.json").exists()


def test_val_class_missing_from_train_is_reported_before_writing(tmp_path):
    src = small_source(tmp_path / "src")
    (src / "val" / "n99999999").mkdir()
    (src / "val" / "n99999999" / "a.JPEG").write_bytes(some_jpeg(src))
    with pytest.raises(FastRSBError, match="n99999999"):
        convert(src, tmp_path / "out", workers=1, progress=False, log=quiet)
    assert not (tmp_path / "out").exists()


def test_deleted_class_folder_is_not_kept_silently(tmp_path):
    import shutil

    src = small_source(tmp_path / "src")
    out = tmp_path / "out"
    convert(src, out, formats=["dali"], workers=1, progress=False, log=quiet)
    gone = first_class(src)
    shutil.rmtree(gone)
    shutil.rmtree(src / "val" / gone.name)
    with pytest.raises(FastRSBError, match=f"lists class {gone.name}.*Restore the folder, or convert into a new OUT"):
        convert(src, out, formats=["dali"], workers=1, progress=False, log=quiet)


def test_hidden_entries_and_symlinks_are_listed_with_reasons(tmp_path):
    src = small_source(tmp_path / "src")
    cls = first_class(src)
    jpeg = some_jpeg(src)
    (cls / ".hidden.JPEG").write_bytes(jpeg)
    (cls / ".cache").mkdir()
    (cls / ".cache" / "x.JPEG").write_bytes(jpeg)
    (src / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "outside.JPEG").write_bytes(jpeg)
    (cls / "to_outside.JPEG").symlink_to(tmp_path / "elsewhere" / "outside.JPEG")
    (cls / "broken.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    (src / "extra").mkdir()
    (src / "extra" / "inside.JPEG").write_bytes(jpeg)
    (cls / "linked_dir").symlink_to(src / "extra", target_is_directory=True)
    (cls / "loop").symlink_to(cls, target_is_directory=True)
    os.mkfifo(cls / "pipe.JPEG")
    out = tmp_path / "out"
    manifests = convert(src, out, formats=["dali"], workers=1, progress=False, log=quiet)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifests["train"]["skipped"]}
    assert "hidden" in skipped[".hidden.JPEG"] and "hidden" in skipped[".cache"]
    assert "hidden" in skipped[".ipynb_checkpoints"]
    assert "outside SRC" in skipped["to_outside.JPEG"]
    assert "broken symlink" in skipped["broken.JPEG"]
    assert "already scanned" in skipped["loop"]
    assert "not a regular file" in skipped["pipe.JPEG"]
    sources = {r["source"] for r in layout.read_samples(layout.samples_path(out, "train"))}
    assert f"{cls.name}/linked_dir/inside.JPEG" in sources  # a symlink inside SRC is followed


def test_pil_over_the_source_reads_what_convert_reads_in_its_order(tmp_path):
    """One scan (loaders/source.py): the PIL loader over a raw ImageFolder reads the converter's files, in
    the converter's order and with its labels: a class folder's files before its sub-folders, depth
    first ('part/inner' before 'part-2', though '-' sorts before '/'), hidden files skipped, a symlinked
    folder inside SRC followed; a file outside every class folder is not read."""
    import torch

    from fastrsb.loaders import make_loader
    from fastrsb.loaders.imagefolder import scan_imagefolder

    src = small_source(tmp_path / "src")
    val = src / "val"
    cls = first_class(src, "val")
    jpegs = sorted(first_class(src).glob("*.JPEG"))  # train images, other bytes than val's
    (cls / "part" / "inner").mkdir(parents=True)
    (cls / "part-2").mkdir()
    (src / "extra").mkdir()
    for i, dest in enumerate([cls / "part" / "b.JPEG", cls / "part" / "inner" / "c.JPEG",
                              cls / "part-2" / "a.JPEG", src / "extra" / "d.JPEG", cls / ".hidden.JPEG",
                              val / "stray.JPEG"]):
        dest.write_bytes(jpegs[i % len(jpegs)].read_bytes())
    (cls / "linked").symlink_to(src / "extra", target_is_directory=True)
    out = tmp_path / "out"
    convert(src, out, formats=["dali"], workers=1, progress=False, log=quiet)
    rows = tsv(out, "val")
    assert all(r["stored"] == layout.KEPT for r in rows)  # same bytes in the shards as in the source

    classes, items = scan_imagefolder(val, src_root=src)
    assert classes == layout.read_classes(out)
    assert [(os.path.relpath(p, val), label) for p, label in items] == [(r["source"], r["label"]) for r in rows]
    inside = [os.path.relpath(p, cls) for p, _ in items if p.startswith(str(cls) + os.sep)]
    assert inside[-4:] == ["linked/d.JPEG", "part/b.JPEG", "part/inner/c.JPEG", "part-2/a.JPEG"]

    # through the loaders: the same labels and pixels, batch by batch, from the source and from the shards
    kw = dict(batch_size=4, res=32, device="cpu", num_workers=0, verbose=False)
    for (a, la), (b, lb) in zip(make_loader("pil", src, "val", **kw), make_loader("pil", out, "val", **kw),
                                strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_float_tiff_is_scaled_not_black(tmp_path):
    from fastrsb.images import BadImage

    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    rgb = load_rgb(tmp_path / "unit.tif")
    assert rgb.shape == (48, 64, 3) and abs(rgb.mean() - 127.5) < 2 and rgb.max() == 255
    Image.fromarray(ramp * 1000 - 5, mode="F").save(tmp_path / "wild.tif")
    with pytest.raises(BadImage, match="float image with values in"):
        load_rgb(tmp_path / "wild.tif")


def test_decompression_bomb_is_rejected_with_its_size(tmp_path):
    from fastrsb.images import BadImage

    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(BadImage, match="12000x12000"):
        load_rgb(tmp_path / "bomb.png", 500)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own guard stays on


def test_adding_a_format_keeps_the_other(tmp_path):
    src = small_source(tmp_path / "src")
    out = tmp_path / "out"
    convert(src, out, formats=["dali"], workers=1, progress=False, log=quiet)
    shards = tree_bytes(layout.wds_dir(out, "train"))
    manifests = convert(src, out, formats=["beton"], workers=1, progress=False, log=quiet)
    assert manifests["train"]["formats"] == ["beton", "dali"]
    assert tree_bytes(layout.wds_dir(out, "train")) == shards
    assert layout.beton_path(out, "train").exists()
    state = json.loads(layout.state_path(out, "train").read_text())
    assert state["formats"] == ["beton", "dali"]
    both = tmp_path / "both"
    convert(src, both, workers=1, progress=False, log=quiet)
    assert tree_bytes(both) == tree_bytes(out)


def test_all_rejected_prints_the_list(tmp_path):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "a.JPEG").write_bytes(b"\xff\xd8 not really")
    (src / "cat" / "b.JPEG").write_bytes(b"")
    logs = []
    with pytest.raises(FastRSBError, match="no decodable image"):
        convert(src, tmp_path / "out", split="train", formats=["dali"], workers=1, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "a.JPEG" in text and "b.JPEG" in text and "0 bytes" in text


def test_fine_jpegs_keep_their_bytes(converted, odd_dataset):
    from fastrsb.loaders.beton import read_beton

    for split in ("train", "val"):
        rows = layout.read_samples(layout.samples_path(converted, split))
        index = layout.ShardIndex.load(converted, split)
        read = layout.ShardBytes(index)
        beton = list(read_beton(layout.beton_path(converted, split)))
        for i, row in enumerate(rows):
            stored = bytes(read(i))
            assert beton[i].data == stored  # both formats hold the same bytes
            source = (odd_dataset / split / row["source"]).read_bytes()
            if row["stored"] == layout.KEPT:
                assert stored == source and row["why"] == ""
            else:
                assert row["stored"] == layout.REENCODED and row["why"]
        if split == "val":  # plain JPEGs: every one kept, at its own size
            assert all(r["stored"] == layout.KEPT for r in rows)
    why = {Path(r["source"]).name: r["why"] for r in layout.read_samples(layout.samples_path(converted, "train"))
           if r["stored"] != layout.KEPT}
    assert set(why) == {"odd_cmyk.JPEG", "odd_png_named.JPEG", "odd_palette.png", "odd_exif_rotated.JPEG",
                        "odd_large.JPEG"}
    assert "CMYK" in why["odd_cmyk.JPEG"] and "PNG" in why["odd_png_named.JPEG"]
    assert "EXIF orientation 6" in why["odd_exif_rotated.JPEG"] and "--max-side 500" in why["odd_large.JPEG"]
    manifest = layout.read_manifest(converted, "train")
    assert manifest["num_kept"] + manifest["num_reencoded"] == manifest["num_samples"]


# ------------------------------------------------------------------ verify tells the truth

def _resign(out: Path, split: str, edit) -> None:
    """Apply `edit` to the manifest and write it back with a valid checksum (a damage the checksum cannot see)."""
    manifest = json.loads(layout.manifest_path(out, split).read_text())
    edit(manifest)
    layout.manifest_path(out, split).write_text(layout.manifest_text(manifest))


@pytest.fixture(scope="module")
def dali_only(tmp_path_factory) -> Path:
    src = small_source(tmp_path_factory.mktemp("v") / "src", train=6, val=3)
    out = src.parent / "out"
    convert(src, out, formats=["dali"], shard_size=4, workers=1, progress=False, log=quiet)
    return out


@pytest.mark.parametrize("damage, match", [
    ("val_missing", "no .*val/manifest.json"),
    ("val_half_written", "no .*val/manifest.json"),
    ("stray_shard", "not part of the conversion"),
    ("manifest_edited", "checksum does not match"),
    ("kept_bytes_differ", "do not hash to the source's sha256"),
    ("shard_cut_short", r"train-\d+\.tar: member \w+\.jpg is cut short .*delete .*fastrsb convert again"),
])
@pytest.mark.parametrize("pooled", [False, True], ids=["in-process", "worker-processes"])
def test_verify_fails_on(damage, match, pooled, dali_only, tmp_path, monkeypatch):
    import shutil

    import fastrsb.verify

    if pooled:  # the check of a large split: units over worker processes, the first damage in order reported
        monkeypatch.setattr(fastrsb.verify, "UNIT", 1)
    out = tmp_path / "out"
    shutil.copytree(dali_only, out)
    if damage == "val_missing":
        shutil.rmtree(out / "val")
    elif damage == "val_half_written":
        layout.manifest_path(out, "val").unlink()
    elif damage == "stray_shard":
        shutil.copy(layout.wds_shards(out, "train")[0], layout.wds_dir(out, "train") / "train-000099.tar")
    elif damage == "manifest_edited":
        manifest = json.loads(layout.manifest_path(out, "train").read_text())
        manifest["counts_per_class"] = {k: v + 1 for k, v in manifest["counts_per_class"].items()}
        layout.manifest_path(out, "train").write_text(json.dumps(manifest, indent=1))
    elif damage == "kept_bytes_differ":
        tar = layout.wds_shards(out, "train")[0]
        member = wds.read_index(tar.with_suffix(".idx"))[0]["jpg"]
        data = bytearray(tar.read_bytes())
        data[member.offset + member.size - 3] ^= 0x01  # inside the entropy-coded data: still decodes
        tar.write_bytes(bytes(data))
        _resign(out, "train", lambda m: m["files"].update(
            {f"wds/{tar.name}": {"sha256": file_sha256(tar), "bytes": tar.stat().st_size}}))
    elif damage == "shard_cut_short":  # and the manifest re-signed, so only reading the bytes can tell
        tar = layout.wds_shards(out, "train")[-1]
        member = wds.read_index(tar.with_suffix(".idx"))[-1]["jpg"]
        tar.write_bytes(tar.read_bytes()[:member.offset + member.size // 2])
        _resign(out, "train", lambda m: m["files"].update(
            {f"wds/{tar.name}": {"sha256": file_sha256(tar), "bytes": tar.stat().st_size}}))
    logs = []
    assert not verify(out, decode=False, log=logs.append)
    assert any(re.search(match, m) for m in logs if m.startswith("DAMAGED")), logs


def segfault_on_second_shard(job):
    """check_unit as a damaged image can make a decoder end it: by SIGSEGV (in a worker process)."""
    if job[0] and job[0].endswith("-000001.tar"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return 0, 0


def test_verify_workers_name_the_shard_whose_check_crashed(dali_only, monkeypatch):
    import fastrsb.verify

    monkeypatch.setattr(fastrsb.verify, "UNIT", 1)
    monkeypatch.setattr(fastrsb.verify, "check_unit", segfault_on_second_shard)
    manifest = layout.read_manifest(dali_only, "train")
    tar = layout.wds_dir(dali_only, "train") / "train-000001.tar"
    first, second = (s["num_samples"] for s in manifest["shards"][:2])
    with pytest.raises(fastrsb.verify.Damaged, match=rf"{re.escape(str(tar))}: a process checking samples "
                                                     rf"{first}\.\.{first + second - 1} died .*delete"):
        fastrsb.verify.check_stored(dali_only, "train", manifest, layout.iter_samples(
            layout.samples_path(dali_only, "train")), False, print, workers=2)


def test_a_cut_short_shard_is_named_by_its_one_reader(dali_only, tmp_path):
    """wds.read_member reads a member at its .idx offset for the beton writer and verify alike."""
    from fastrsb.loaders.beton import ShardSamples

    shard = layout.wds_shards(dali_only, "train")[0]
    tar = tmp_path / shard.name
    tar.write_bytes(shard.read_bytes())
    index = wds.read_index(shard.with_suffix(".idx"))
    first, last = index[0], index[-1]
    whole = wds.read_member(tar, first["jpg"])
    assert whole[:2] == b"\xff\xd8" and len(whole) == first["jpg"].size
    samples = ShardSamples([str(tar)], [0, 0], [first["jpg"].offset, last["jpg"].offset],
                           [first["jpg"].size, last["jpg"].size], [0, 1], [1, 1], [1, 1],
                           [int(first["jpg"].key), int(last["jpg"].key)])
    assert samples[0][0].jpeg == whole
    tar.write_bytes(tar.read_bytes()[:last["jpg"].offset + 5])
    fix = f"delete {tar} and its .json record, then run the same fastrsb convert again"
    with pytest.raises(FastRSBError, match=rf"{re.escape(str(tar))}: member {last['jpg'].key}\.jpg is cut short"
                       rf" \(its \.idx puts {last['jpg'].size} bytes at offset {last['jpg'].offset}, the file holds"
                       rf" 5 of them\); {re.escape(fix)}"):
        wds.read_member(tar, last["jpg"])
    with pytest.raises(FastRSBError, match=re.escape(fix)):
        samples[1]


def test_unreadable_manifest_is_one_line(dali_only, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(dali_only, out)
    layout.manifest_path(out, "train").write_text("{not json")
    proc = run_cli("verify", out, "--quick", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    line = next(m for m in proc.stdout.splitlines() if m.startswith("DAMAGED"))
    assert "manifest.json: unreadable" in line and "fastrsb convert again" in line


def test_decode_counts_can_fire_and_a_damaged_image_is_named(dali_only, tmp_path):
    import shutil

    from fastrsb.verify import Damaged, _compare, read_shard_labels

    rows = layout.read_samples(layout.samples_path(dali_only, "val"))
    sizes = np.array([(r["height"], r["width"]) for r in rows])
    tars = layout.wds_shards(dali_only, "val")
    sizes[1] += 1  # one sample decodes to another size than recorded
    labels, decoded = read_shard_labels(tars, True, sizes)
    assert decoded == len(rows) - 1
    with pytest.raises(Damaged, match=f"decoded {len(rows) - 1} of {len(rows)}"):
        _compare(tars[0].parent, labels, np.array([r["label"] for r in rows]), decoded)
    # a re-encoded sample with a wiped header (no source hash to catch it): PIL's decode names it
    out = tmp_path / "out"
    shutil.copytree(dali_only, out)
    tar = layout.wds_shards(out, "val")[0]
    member = wds.read_index(tar.with_suffix(".idx"))[0]["jpg"]
    data = bytearray(tar.read_bytes())
    data[member.offset:member.offset + 64] = bytes(64)
    tar.write_bytes(bytes(data))
    table = layout.read_samples(layout.samples_path(out, "val"))
    table[0].update(stored=layout.REENCODED, why="test", source_sha256="")
    layout.write_samples(layout.samples_path(out, "val"), [[r[c] for c in layout.SAMPLE_COLUMNS] for r in table])
    _resign(out, "val", lambda m: m["files"].update({
        f"wds/{tar.name}": {"sha256": file_sha256(tar), "bytes": tar.stat().st_size},
        "samples.jsonl": {"sha256": file_sha256(layout.samples_path(out, "val")),
                          "bytes": layout.samples_path(out, "val").stat().st_size}}))
    logs = []
    assert not verify(out, decode=True, log=logs.append)
    assert any("sample 0" in m and "does not decode" in m and str(tar) in m for m in logs), logs


def crash_on_second_shard(kind, paths, decode, sizes, conn):
    """A reader that dies by SIGSEGV as DALI does on some damaged JPEGs (run in the spawned child)."""
    if any(p.endswith("-000001.tar") for p in paths):
        os.kill(os.getpid(), signal.SIGSEGV)
    conn.send(("ok", [], 0))
    conn.close()


def test_a_decoder_crash_names_the_shard(dali_only):
    from fastrsb.verify import Damaged, _guarded_read

    tars = layout.wds_shards(dali_only, "train")
    assert len(tars) >= 2
    with pytest.raises(Damaged, match=r"train-000001\.tar: the DALI decoder crashed \(signal SIGSEGV\)"):
        _guarded_read("dali", tars, True, None, reader=crash_on_second_shard)


def test_shard_writer_writes_the_bytes_tarfile_writes(tmp_path):
    """The shard writer builds ustar headers itself (tarfile's addfile is slow at ImageNet's size): the tar
    is byte for byte what tarfile writes for the same members, and tarfile reads it back."""
    import io
    import random
    import tarfile

    for name, size in [("000000001.jpg", 0), ("k.cls", 1), ("x" * 96 + ".jpg", 511), ("é" * 40 + ".jpg", 512),
                       ("b/" * 60 + "c.jpg", 100_000), ("big.jpg", 8**11 - 1)]:
        assert wds.member_header(name, size) == wds._tarinfo(name, size).tobuf(
            tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), (name, size)
    with pytest.raises(ValueError, match="name is too long"):  # as tarfile refuses it
        wds.member_header("a" * 101, 513)
    with pytest.raises(ValueError, match="overflow"):
        wds.member_header("big.jpg", 8**11)
    rng = random.Random(0)
    samples = [(f"{rng.randrange(10**9):09d}", rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randrange(20_000)])),
                rng.randrange(-1, 100_000)) for _ in range(300)]
    writer = wds.ShardWriter(tmp_path / "s.tar")
    for key, data, label in samples:
        writer.add(key, data, label)
    writer.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label in samples:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                tar.addfile(wds._tarinfo(name, len(payload)), io.BytesIO(payload))
    assert (tmp_path / "s.tar").read_bytes() == reference.getvalue()
    index = wds.read_index(tmp_path / "s.idx")
    assert [wds.read_member(tmp_path / "s.tar", m["jpg"]) for m in index] == [d for _, d, _ in samples]
