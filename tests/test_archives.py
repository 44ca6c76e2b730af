"""`fastrsb convert DIR OUT` over ImageNet as downloaded (loaders/imagenet.py): the official tars, Kaggle's
tree, Hugging Face's parquet and webdataset shards, each built here from one small ImageFolder and
converted to the same bytes as that ImageFolder; odd members named, unsafe names refused, resume after
kill -9, the missing extra named."""
import io
import json
import os
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli, tree_bytes, wait_for
from fastrsb.bench.scale import meta_mat
from fastrsb.demo_data import make_demo_data
from fastrsb.errors import FastRSBError
from fastrsb.loaders import layout

pytestmark = pytest.mark.timeout(900)

# DALI shards only (the beton is written from the same bytes; the kill -9 test below compares betons too)
ARGS = ["--shard-size", "6", "--workers", "2", "--no-progress", "--format", "dali"]


# ------------------------------------------------------------------------------- the ImageFolder

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The ImageFolder every layout below is built from: 3 classes, ImageNet's val names (numbered in an
    order that mixes classes), the demo oddities in train, and a PNG decompression bomb."""
    root = tmp_path_factory.mktemp("archives") / "imagefolder"
    make_demo_data(root, num_classes=3, train_per_class=5, val_per_class=3, min_size=48, max_size=96,
                   oddities=True, large_side=900, seed=5)
    Image.new("1", (12000, 12000)).save(root / "train" / "n10000001" / "bomb.png")
    val = sorted((root / "val").rglob("*.JPEG"))
    order = np.random.default_rng(0).permutation(len(val))
    for n, k in enumerate(order, 1):
        val[k].rename(val[k].with_name(f"ILSVRC2012_val_{n:08d}.JPEG"))
    return root


def files_of(root: Path, split: str):
    """(wnid, file name, bytes) of a split, in a scrambled order (archives need not be sorted)."""
    items = [(p.parent.name, p.name, p.read_bytes()) for p in sorted((root / split).rglob("*")) if p.is_file()]
    return [items[k] for k in np.random.default_rng(1).permutation(len(items))]


def val_number(name: str) -> int:
    return int(name[len("ILSVRC2012_val_"):-len(".JPEG")])


def add(tar: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            add(tar, name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- the layouts

def make_official(folder: Path, root: Path, extra_train=(), extra_val=()) -> Path:
    """ILSVRC2012_img_train.tar (a tar of <wnid>.tar), ILSVRC2012_img_val.tar (flat) and the devkit."""
    root.mkdir(parents=True)
    by_class = {}
    for wnid, name, data in files_of(folder, "train"):
        by_class.setdefault(wnid, []).append((name, data))
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as tar:
        for wnid in reversed(sorted(by_class)):
            inner = by_class[wnid] + [(n, d) for w, n, d in extra_train if w == wnid]
            add(tar, f"{wnid}.tar", tar_bytes(inner))
    val = files_of(folder, "val")
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for _, name, data in list(val) + list(extra_val):
            add(tar, name, data)
    ids = meta_mat(root / "meta.mat", sorted(by_class))  # IDs not in WNID order, a parent synset after
    truth = "".join(f"{ids[w]}\n" for w, _, _ in sorted(val, key=lambda v: val_number(v[1])))
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", (root / "meta.mat").read_bytes())
        add(tar, "ILSVRC2012_devkit_t12/readme.txt", b"the devkit\n")
    (root / "meta.mat").unlink()
    return root


def make_kaggle(folder: Path, root: Path) -> Path:
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, name, data in files_of(folder, "train"):
        (base / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (base / "train" / wnid / name).write_bytes(data)
    (base / "val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for wnid, name, data in files_of(folder, "val"):
        (base / "val" / name).write_bytes(data)
        rows.append(f"{name[:-5]},{wnid} 10 20 30 40 {wnid} 1 2 3 4 ")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    wnids = sorted(p.name for p in (folder / "train").iterdir())
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} thing {w}, other name\n" for w in wnids))
    return root


def make_parquet(folder: Path, root: Path, metadata=True) -> Path:
    """data/{train,validation}-0000N-of-00002.parquet, row groups of 4 rows, and HF's classes.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wnids = sorted(p.name for p in (folder / "train").iterdir())
    (root / "data").mkdir(parents=True)
    for split, prefix in (("train", "train"), ("val", "validation")):
        rows = files_of(folder, split)
        for k in range(2):
            part = rows[k::2]
            table = pa.table({"image": [{"bytes": d, "path": n} for _, n, d in part],
                              "label": pa.array([wnids.index(w) for w, _, _ in part], pa.int64())})
            pq.write_table(table, root / "data" / f"{prefix}-{k:05d}-of-00002.parquet", row_group_size=4)
    test = pa.table({"image": [{"bytes": d, "path": n} for _, n, d in files_of(folder, "val")],
                     "label": pa.array([-1] * len(files_of(folder, "val")), pa.int64())})
    pq.write_table(test, root / "data" / "test-00000-of-00001.parquet")  # no labels: not converted
    if metadata:
        entries = "".join(f'        "{w}": "thing {w}, other name",\n' for w in wnids)
        (root / "classes.py").write_text("from collections import OrderedDict\n\nIMAGENET2012_CLASSES = OrderedDict(\n"
                                         "    {\n" + entries + "    }\n)\n")
    return root


def make_webdataset(folder: Path, root: Path, metadata=True) -> Path:
    """imagenet1k-{train-000N,validation-0N}.tar: KEY.<ext> + KEY.cls (+ KEY.json), as timm publishes them."""
    wnids = sorted(p.name for p in (folder / "train").iterdir())
    root.mkdir(parents=True)
    for split, name in (("train", "imagenet1k-train-{:04d}.tar"), ("val", "imagenet1k-validation-{:02d}.tar")):
        rows = files_of(folder, split)
        for k in range(2):
            with tarfile.open(root / name.format(k), "w") as tar:
                for wnid, file, data in rows[k::2]:
                    stem = file.split(".")[0]
                    add(tar, file, data)
                    add(tar, f"{stem}.cls", str(wnids.index(wnid)).encode())
                    add(tar, f"{stem}.json", json.dumps({"filename": file}).encode())
    if metadata:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} thing {w}\n" for w in wnids))
    return root


LAYOUTS = {"imagenet-tars": make_official, "kaggle": make_kaggle, "hf-parquet": make_parquet,
           "webdataset": make_webdataset}


# ------------------------------------------------------------------------------------ comparison

@pytest.fixture(scope="module")
def reference(folder) -> Path:
    out = folder.parent / "reference"
    run_cli("convert", folder, out, *ARGS)
    return out


def assert_same_conversion(got: Path, reference: Path, layout_name: str) -> None:
    """Same classes, samples (keys, labels, sizes, sources), shard and beton bytes; manifests equal but
    for the source they name."""
    assert layout.read_classes(got) == layout.read_classes(reference)
    for split in ("train", "val"):
        ref = tree_bytes(layout.split_dir(reference, split))
        now = tree_bytes(layout.split_dir(got, split))
        assert sorted(now) == sorted(ref)
        for name in ref:
            if name != "manifest.json":
                assert now[name] == ref[name], f"{split}/{name} differs"
        manifests = [json.loads(ref["manifest.json"]), json.loads(now["manifest.json"])]
        assert manifests[1]["source_layout"] == layout_name and manifests[0]["source_layout"] == "imagefolder"
        for m in manifests:
            for key in ("source", "source_layout", "checksum"):
                m.pop(key)
        assert manifests[1] == manifests[0]


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_each_layout_converts_to_the_imagefolders_bytes(layout_name, folder, reference, tmp_path):
    src = LAYOUTS[layout_name](folder, tmp_path / "download")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, *ARGS)
    assert f"reading {layout_name} (" in proc.stdout, proc.stdout
    if layout_name == "hf-parquet":
        assert "not converted, without labels: 1 test shards" in proc.stdout
    assert_same_conversion(out, reference, layout_name)
    manifest = layout.read_manifest(out, "train")
    # the odd files are named, the bomb rejected with its size, nothing dropped
    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {"odd_truncated.JPEG", "odd_empty.JPEG", "bomb.png"}
    assert "12000x12000" in rejected["bomb.png"]
    assert [Path(r["path"]).name for r in manifest["non_images"]] == ["odd_notes.txt"]
    stored = {Path(r["source"]).name: r["why"] for r in layout.read_samples(layout.samples_path(out, "train"))}
    assert "CMYK" in stored["odd_cmyk.JPEG"] and "PNG" in stored["odd_png_named.JPEG"]
    assert stored["odd_gray.JPEG"] == ""  # a grayscale JPEG keeps its bytes
    n_files = sum(1 for p in (folder / "train").rglob("*") if p.is_file())
    assert manifest["num_samples"] + len(manifest["rejected"]) + len(manifest["non_images"]) == n_files
    if layout_name == "imagenet-tars":
        assert manifest["source"] == str(src / "ILSVRC2012_img_train.tar")
    assert "verify: OK" in run_cli("verify", out).stdout


def test_labels_are_torchvisions_through_the_devkit(folder, tmp_path):
    """Val labels: the ground truth's ILSVRC2012_ID, through meta.mat's leaf synsets, to the sorted WNIDs."""
    src = make_official(folder, tmp_path / "download")
    out = tmp_path / "out"
    run_cli("convert", src, out, *ARGS)
    classes = layout.read_classes(out)
    assert classes == sorted(p.name for p in (folder / "train").iterdir())
    for row in layout.read_samples(layout.samples_path(out, "val")):
        wnid, name = row["source"].split("/")
        assert (folder / "val" / wnid / name).is_file() and classes[row["label"]] == wnid


@pytest.mark.parametrize("make", [make_parquet, make_webdataset], ids=["hf-parquet", "webdataset"])
def test_integer_labels_without_metadata_name_their_classes_by_number(make, folder, tmp_path):
    src = make(folder, tmp_path / "download", metadata=False)
    out = tmp_path / "out"
    run_cli("convert", src, out, *ARGS)
    assert layout.read_classes(out) == ["0", "1", "2"]
    wnids = sorted(p.name for p in (folder / "train").iterdir())
    for split in ("train", "val"):
        rows = layout.read_samples(layout.samples_path(out, split))
        assert rows
        for row in rows:
            label_name, name = row["source"].split("/")
            assert int(label_name) == row["label"] and (folder / split / wnids[row["label"]] / name).is_file()


def test_unsafe_hidden_and_odd_members_are_named_not_read(folder, tmp_path):
    evil = b"\xff\xd8 not really"
    src = make_official(folder, tmp_path / "download",
                        extra_train=[("n10000000", "../evil.JPEG", evil), ("n10000000", "/abs/evil.JPEG", evil),
                                     ("n10000002", "._n10000002_00000.JPEG", evil)],
                        extra_val=[("", "../../evil_val.JPEG", evil), ("", "README.txt", b"hello")])
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "a") as tar:
        add(tar, "notes.txt", b"a file beside the class tars")
        info = tarfile.TarInfo("n10000001.lnk")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    out = tmp_path / "work" / "out"
    proc = run_cli("convert", src, out, *ARGS)
    assert "unsafe member name" in proc.stdout  # the report names them
    assert not any(p.name.startswith("evil") for p in tmp_path.rglob("*")), "a member was written as a file"
    train, val = layout.read_manifest(out, "train"), layout.read_manifest(out, "val")
    skipped = {r["path"]: r["reason"] for r in train["skipped"] + val["skipped"]}
    assert "unsafe" in skipped["ILSVRC2012_img_train.tar/n10000000.tar/../evil.JPEG"]
    assert "unsafe" in skipped["ILSVRC2012_img_train.tar/n10000000.tar//abs/evil.JPEG"]
    assert "unsafe" in skipped["ILSVRC2012_img_val.tar/../../evil_val.JPEG"]
    assert "hidden" in skipped["ILSVRC2012_img_train.tar/n10000002.tar/._n10000002_00000.JPEG"]
    assert "link" in skipped["ILSVRC2012_img_train.tar/n10000001.lnk"]
    assert "ground-truth" in skipped["ILSVRC2012_img_val.tar/README.txt"]
    assert [r["path"] for r in train["non_images"]] == ["n10000000/odd_notes.txt", "notes.txt"]


def test_layout_errors_name_the_file_and_the_fix(folder, tmp_path):
    from fastrsb.convert import convert

    src = make_official(folder, tmp_path / "official")
    (src / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(FastRSBError, match="ILSVRC2012_devkit_t12.tar.gz: missing"):
        convert(src, tmp_path / "out1", formats=["dali"], progress=False, log=lambda *a: None)
    both = make_kaggle(folder, tmp_path / "both")
    make_official(folder, tmp_path / "o2")
    for f in (tmp_path / "o2").iterdir():
        f.rename(both / f.name)
    with pytest.raises(FastRSBError, match="several datasets.*--layout imagenet-tars or --layout kaggle"):
        convert(both, tmp_path / "out2", formats=["dali"], progress=False, log=lambda *a: None)
    with pytest.raises(FastRSBError, match="is the folder holding the kaggle files"):
        convert(both, both, formats=["dali"], progress=False, log=lambda *a: None, layout_name="kaggle")
    cut = make_official(folder, tmp_path / "cut")
    train = cut / "ILSVRC2012_img_train.tar"
    os.truncate(train, train.stat().st_size // 2)
    with pytest.raises(FastRSBError, match="ILSVRC2012_img_train.tar.*(truncated|not a readable tar).*download"):
        convert(cut, tmp_path / "out3", formats=["dali"], progress=False, log=lambda *a: None)


@pytest.mark.parametrize("package,make", [("scipy", make_official), ("pyarrow", make_parquet)])
def test_missing_extra_names_the_install(package, make, folder, tmp_path, monkeypatch):
    from fastrsb.convert import convert

    src = make(folder, tmp_path / "download")
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(FastRSBError, match=rf"{package} is not installed.*pip install 'fastrsb\[imagenet\]'"):
        convert(src, tmp_path / "out", formats=["dali"], progress=False, log=lambda *a: None)


# ---------------------------------------------------------------------------------------- faults

def test_kill_9_then_resume_is_byte_identical_on_the_official_tars(tmp_path):
    """As tests/test_faults.py on a folder: kill -9 while train shards, then val shards, are written; both
    formats, and the same bytes as the ImageFolder's conversion."""
    import subprocess

    folder = make_demo_data(tmp_path / "imagefolder", num_classes=3, train_per_class=40, val_per_class=10,
                            min_size=160, max_size=320, seed=9)
    val = sorted((folder / "val").rglob("*.JPEG"))
    for n, path in enumerate(val, 1):
        path.rename(path.with_name(f"ILSVRC2012_val_{n:08d}.JPEG"))
    src = make_official(folder, tmp_path / "download")
    args = ["--shard-size", "10", "--workers", "2", "--no-progress"]
    reference = tmp_path / "reference"
    run_cli("convert", src, reference, *args)
    out = tmp_path / "out"
    hits = 0
    for split in ("train", "val"):
        before = set(layout.wds_dir(out, split).glob("*.json"))
        proc = subprocess.Popen([sys.executable, "-m", "fastrsb", "convert", str(src), str(out), *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if wait_for(lambda: set(layout.wds_dir(out, split).glob("*.json")) - before, proc):
            os.killpg(proc.pid, signal.SIGKILL)
            hits += 1
        proc.communicate(timeout=120)
    assert hits == 2, "the conversion finished before it could be killed"
    proc = run_cli("convert", src, out, *args)
    assert "resuming" in proc.stdout
    assert tree_bytes(out) == tree_bytes(reference)
    run_cli("convert", folder, tmp_path / "from_folder", *args)
    assert_same_conversion(out, tmp_path / "from_folder", "imagenet-tars")
