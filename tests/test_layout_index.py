"""The loaders' index of a converted split: `wds.read_offsets` and `layout.read_sample_columns` give what
the general readers (`wds.read_index`, `layout.read_samples`) give, without an object per sample."""
import numpy as np
import pytest

from fastrsb.errors import FastRSBError
from fastrsb.loaders import layout, wds


def _members(key, extensions, offset):
    return [wds.Member(key, ext, offset + 512 * (k + 1), 100 + k) for k, ext in enumerate(extensions)]


def _write(path, samples):
    path.write_text(wds.format_index(samples))
    return path


def _expected(path, extension):
    entries = wds.read_index(path)
    return ([m[extension].offset for m in entries], [m[extension].size for m in entries])


@pytest.mark.parametrize("layout_of", [
    lambda i: ("jpg", "cls"),  # what the converter writes
    lambda i: ("cls", "jpg"),  # another member order
    lambda i: ("jpg", "cls", "json") if i % 3 == 0 else ("cls", "jpg"),  # members differ per sample
    lambda i: ("jpg", "cls", "json", "txt") if i == 1 else ("jpg", "cls"),  # token count a multiple of 8 lines
])
def test_read_offsets_matches_read_index(tmp_path, layout_of):
    samples = [_members(f"{i:04d}", layout_of(i), 10_000 * i) for i in range(7)]
    path = _write(tmp_path / "a.idx", samples)
    offsets, sizes = wds.read_offsets(path, "jpg")
    want_offsets, want_sizes = _expected(path, "jpg")
    assert offsets.dtype == sizes.dtype == np.int64
    assert offsets.tolist() == want_offsets and sizes.tolist() == want_sizes


def test_read_offsets_refuses_what_read_index_refuses(tmp_path):
    missing = _write(tmp_path / "missing.idx", [_members("a", ("jpg", "cls"), 0), _members("b", ("cls",), 0)])
    with pytest.raises(ValueError, match="missing.idx: sample 1 has no .jpg"):
        wds.read_offsets(missing, "jpg")
    twice = _write(tmp_path / "twice.idx", [_members("a", ("jpg", "jpg"), 0), _members("b", ("jpg", "cls"), 0)])
    with pytest.raises(ValueError, match="twice.idx: sample 0 has not exactly one .jpg"):
        wds.read_offsets(twice, "jpg")
    short = _write(tmp_path / "short.idx", [_members("a", ("jpg", "cls"), 0)])
    short.write_text(short.read_text().replace("v1.2 1", "v1.2 2"))
    with pytest.raises(ValueError, match="header says 2 samples, found 1"):
        wds.read_offsets(short, "jpg")
    bad = _write(tmp_path / "bad.idx", [_members("a", ("jpg", "cls"), 0)])
    bad.write_text(bad.read_text().replace("jpg 512", "jpg 5x2"))
    with pytest.raises(ValueError, match="bad.idx: malformed"):
        wds.read_offsets(bad, "jpg")
    (tmp_path / "empty.idx").write_text("v1.2 0\n")
    assert wds.read_offsets(tmp_path / "empty.idx", "jpg")[0].size == 0


def test_shard_index_matches_the_tables(converted):
    for split in layout.split_names(converted):
        rows = layout.read_samples(layout.samples_path(converted, split))
        index = layout.ShardIndex.load(converted, split)
        assert index.labels.tolist() == [r["label"] for r in rows]
        assert index.heights.tolist() == [r["height"] for r in rows]
        assert index.widths.tolist() == [r["width"] for r in rows]
        want = [(str(tar), m["jpg"].offset, m["jpg"].size) for tar in layout.wds_shards(converted, split)
                for m in wds.read_index(tar.with_suffix(".idx"))]
        got = [(index.shards[s], o, n) for s, o, n in zip(index.shard_of.tolist(), index.offset.tolist(),
                                                           index.size.tolist())]
        assert got == want
        read = layout.ShardBytes(index)
        assert bytes(read(len(index) - 1))[:2] == b"\xff\xd8"  # a JPEG starts at every offset


def test_read_sample_columns_names_the_table(tmp_path):
    table = tmp_path / "train" / "samples.jsonl"
    table.parent.mkdir()
    layout.write_samples(table, [[0, "k0", 3, 10, 20, 0, "a/x.jpg", layout.KEPT, "", "00"]])
    assert {k: v.tolist() for k, v in layout.read_sample_columns(table, ("label", "width")).items()} == \
        {"label": [3], "width": [20]}
    with pytest.raises(FastRSBError, match="samples.jsonl: unreadable per-sample table.*re-run fastrsb convert"):
        layout.read_sample_columns(table, ("no such column",))
    table.write_text(table.read_text() + "[1, \n")
    with pytest.raises(FastRSBError, match="samples.jsonl: unreadable per-sample table"):
        layout.read_sample_columns(table, ("label",))
