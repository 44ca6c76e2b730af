"""Benchmark result schema, `fastrsb report` plots and tables, and the seed-sweep statistics."""
import json
import statistics

import pytest
from PIL import Image

from fastrsb.benchlog import SCHEMA, emit, read_results, record, validate
from fastrsb.errors import FastRSBError
from fastrsb.report import report
from fastrsb.sweep import parse_seeds, seed_stats


def test_record_validates_and_computes_the_ratio(tmp_path, capsys):
    rec = record("loader", "ffcv train 160", 840.0, config={"res": 160}, baseline=("timm create_loader", 420.0),
                 device="cpu")
    assert rec["schema"] == SCHEMA and rec["ratio"] == 2.0 and rec["device"].startswith("CPU")
    emit(rec, tmp_path / "r.jsonl")
    assert json.loads(capsys.readouterr().out) == rec
    assert read_results([tmp_path / "r.jsonl"]) == [rec]
    broken = dict(rec)
    del broken["value"]
    with pytest.raises(ValueError, match="value"):
        validate(broken)
    with pytest.raises(ValueError, match="ratio"):
        validate({k: v for k, v in rec.items() if k != "ratio"})


def test_report_writes_pngs_and_markdown(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for backend, value, base in (("ffcv", 900.0, 450.0), ("dali", 700.0, 450.0)):
        emit(record("loader", f"{backend} train 160", value, baseline=("timm", base), device="cpu"),
             results / "loader.jsonl")
    emit(record("step", "lamb 160 b256", 12.5, device="cpu"), results / "step.jsonl")
    run = results / "run1"
    run.mkdir()
    logs = [{"kind": "step", "epoch": 0, "step": s, "loss": 1.0 / (s + 1), "lr": 0.1, "img_per_s": 50.0}
            for s in range(5)]
    logs += [{"kind": "epoch", "epoch": e, "step": 5 * (e + 1), "loss": 0.5, "top1": 40.0 + 10 * e,
              "img_per_s": 50.0} for e in range(3)]
    logs.append({"kind": "summary", "recipe": "a3", "model_name": "resnet10t", "epochs_done": 3, "top1": 60.0,
                 "top5": 95.0, "img_per_s": 50.0, "wall_time_s": 12.0, "finished": True})
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in logs) + "\n")
    md = report([results], tmp_path / "rep")
    text = md.read_text()
    assert "| loader | ffcv train 160 |" in text and "| 2 |" in text  # ratio 900/450
    assert "| run1 | a3 | resnet10t | 3 |" in text
    for png in ("throughput_loader.png", "throughput_step.png", "training_curves.png"):
        with Image.open(tmp_path / "rep" / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
        assert f"({png})" in text
    with pytest.raises(FastRSBError, match="no benchmark results"):
        report([tmp_path / "rep"], tmp_path / "rep2")


def test_parse_seeds():
    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("1,3,7") == [1, 3, 7]
    assert parse_seeds("0-2,10") == [0, 1, 2, 10]
    for bad in ("", "5-1", "a", "1,1", "-3"):
        with pytest.raises(FastRSBError):
            parse_seeds(bad)


def test_seed_stats():
    top1 = [79.5, 80.0, 79.7, 79.9]
    runs = [{"top1": v, "top5": v + 15} for v in top1] + [{"top1": None}]
    stats = seed_stats(runs)
    assert stats["top1"]["n"] == 4
    assert stats["top1"]["mean"] == pytest.approx(statistics.fmean(top1))
    assert stats["top1"]["std"] == pytest.approx(statistics.stdev(top1))
    assert (stats["top1"]["min"], stats["top1"]["max"]) == (79.5, 80.0)
    assert stats["top5"]["mean"] == pytest.approx(statistics.fmean(top1) + 15)
    assert seed_stats([{"top1": 50.0}])["top1"]["std"] == 0.0


def test_traffic_counts_bytes_and_kernels_of_an_eager_call():
    """Each op's distinct input and output bytes; views move nothing; a gather reads what it writes; an
    index_copy_ reads and writes the rows it touches; a broadcast operand counts once."""
    import torch

    from fastrsb.bench import traffic

    x = torch.zeros(10, 100, dtype=torch.uint8)
    index = torch.tensor([1, 3], dtype=torch.int64)
    scale = torch.ones(1, 100).expand(10, 100)  # stride 0 over rows: 400 bytes

    def fn():
        y = x.float()  # 1000 + 4000
        y = y.view(100, 10).t().contiguous()  # views, then a copy (4000 + 4000)
        z = y * scale  # 4000 + 400 + 4000
        picked = z.index_select(0, index)  # 2 rows of 400 bytes, read and written, + 16 index bytes
        return z.index_copy_(0, index, picked)  # 2 * (800 + 16)

    moved, result = traffic.trace(fn)
    assert result.shape == (10, 100)
    assert moved.kernels == 5 and moved.bytes == 5000 + 8000 + 8400 + 1616 + 1632
    assert moved.by_op["aten.mul"] == 8400 and moved.top(1) == {"aten.mul": round(8400 / moved.bytes, 3)}
    floor = traffic.floor_ms(moved, images=10, per=256)
    assert floor["bytes_ms"] == round(1e3 * moved.bytes * 25.6 / 3.35e12, 4)
    assert floor["launch_ms"] == round(1e3 * 5 * 5e-6 * 25.6, 4)
