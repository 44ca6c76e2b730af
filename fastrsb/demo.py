"""`fastrsb demo`: the whole product on built-in data, on a machine with nothing but the package.

1. `demo-data` with every oddity (10 visually distinct classes, ImageNet-like sizes);
2. `convert` to both formats (FFCV beton, DALI shards), naming the rejected and non-image files;
3. `verify` the conversion through FFCV and DALI;
4. loader throughput of every usable backend followed by the batched RandAugment, against timm's
   `create_loader` with the same RandAugment in its workers, in the same run (like for like);
5. a few epochs of the A3 recipe (scaled down: small model, small images, global batch 64, 32 quick) with
   `auto`'s loader, the GPU augmentation and LAMB, on the GPU when there is one;
6. a summary table, `results.jsonl` (benchmark schema) and `report/` (plots and report.md).

`--quick` (what CI runs) is the same with fewer images and epochs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .benchlog import emit, record

# The loader line's windows, the same on both sides: one untimed epoch (timm's first batches include starting
# its workers; prefetched queues fill while they wait), then the median of LOADER_EPOCHS timed epochs. Whole
# epochs, because the source folder holds one 10,000-px image that timm's workers decode on every pass
# (fastrsb's formats hold it converted): a window of a few batches held it or not, and timm's figure
# swung several-fold from window to window on the 2-core CPU.
LOADER_EPOCHS = 3


def _steady_rate(loader, res: int, device: str) -> tuple[float, list[float]]:
    """Median img/s of LOADER_EPOCHS whole epochs after one untimed epoch."""
    from .bench.loader import measure

    epoch = len(loader)
    return measure(loader, res=res, device=device, warmup=epoch, batches=epoch, windows=LOADER_EPOCHS, runs=1)


def _loader_bench(data: Path, src: Path, backends: list[str], res: int, batch: int, device: str, log) -> list[dict]:
    """Like for like: each fastrsb loader followed by the trainer's augmentation (on `device`), against
    timm's create_loader, whose workers do the same RandAugment; both at steady state (`_steady_rate`)."""
    from .bench.loader import TimmBaseline, rejected_files, train_augment, with_train_augment
    from .loaders import make_loader

    results = []
    base = TimmBaseline(src, "train", res=res, batch_size=batch, workers=os.cpu_count() or 1, device=device,
                        skip=rejected_files(data, "train"))  # the images both sides read
    base_rate, base_rates = _steady_rate(base, res, device)
    del base
    baseline = ("timm create_loader: PIL decode, RRC, flip, RandAugment m6 in its workers", base_rate)
    augment = None
    for backend in backends:
        loader = make_loader(backend, data, "train", batch_size=batch, res=res, device=device, verbose=False)
        augment = augment or train_augment(loader.num_classes, device)
        rate, rates = _steady_rate(with_train_augment(loader, augment), res, device)
        del loader
        results.append(record("loader", f"{backend} train {res} + GPU augmentation", rate, baseline=baseline, device=device,
                              config={"backend": backend, "split": "train", "res": res, "batch_size": batch,
                                      "fastrsb_side": f"{backend} decode+RRC+flip, then the trainer's augmentation on {device}",
                                      "timm_side": baseline[0], "warmup_epochs": 1, "windows": LOADER_EPOCHS,
                                      "window": "one epoch"},
                              img_per_s_windows=[round(r, 1) for r in rates],
                              baseline_img_per_s_windows=[round(r, 1) for r in base_rates]))
        log(f"  {backend:5} + augmentation on {device}, train {res}px: {rate:8,.0f} img/s  "
            f"(timm's loader with RandAugment: {base_rate:,.0f}, x{rate / base_rate:.2f})")
    return results


def demo(out: str | Path = "demo", quick: bool = False, device: str | None = None, model: str | None = None,
         epochs: int | None = None, log=print) -> dict:
    from .convert import convert
    from .loaders.registry import usable as backend_usable
    from .demo_data import make_demo_data
    from .recipes import A3, override
    from .report import report
    from .train import train
    from .verify import verify

    t0 = time.perf_counter()
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    classes, per_class, val_per_class = (4, 40, 10) if quick else (10, 80, 20)
    res = 64 if not cuda else 128
    epochs = epochs or (4 if quick else 6)
    global_batch = 32 if quick else 64  # quick: 166 images, so 5 steps an epoch
    model = model or ("resnet18" if cuda else "resnet10t")
    results_file = out / "results.jsonl"
    if results_file.exists():
        results_file.unlink()
    summary_rows = []

    log(f"[1/5] demo data: {classes} classes, {per_class} train + {val_per_class} val images each, with oddities")
    src = make_demo_data(out / "src", num_classes=classes, train_per_class=per_class, val_per_class=val_per_class,
                         oddities=True, large_side=4000 if quick else 10000, seed=0)

    formats = ["dali"] + (["beton"] if backend_usable("ffcv") else [])
    log(f"[2/5] convert to {' and '.join(formats)}")
    start = time.perf_counter()
    manifests = convert(src, out / "data", formats=formats, progress=False, log=lambda m: log("  " + m))
    convert_s = time.perf_counter() - start
    n_images = sum(m["num_files_scanned"] for m in manifests.values())
    emit(record("convert", f"fastrsb convert {'+'.join(formats)}", n_images / convert_s, device="cpu",
                config={"images": n_images}), results_file, echo=False)
    train_manifest = manifests["train"]
    summary_rows.append(("convert", f"{train_manifest['num_samples']} train images, {train_manifest['num_rejected']} "
                         f"rejected, {train_manifest['num_non_images']} non-image, {n_images / convert_s:,.0f} img/s"))

    log("[3/5] verify both formats (checksums, counts, labels)")
    ok = verify(out / "data", decode=False, log=lambda m: log("  " + m))
    summary_rows.append(("verify", "OK" if ok else "FAILED"))

    from .loaders import registry

    backends = [b for b in registry.names() if backend_usable(b)]
    log(f"[4/5] loader + GPU augmentation throughput on {device}: {', '.join(backends)} against timm's loader with "
        "RandAugment")
    for rec in _loader_bench(out / "data", src, backends, res, 32, device, log):
        emit(rec, results_file, echo=False)
        summary_rows.append((f"loader {rec['config']['backend']}", f"{rec['value']:,.0f} img/s (x{rec['ratio']:.2f} timm)"))

    log(f"[5/5] train {model} with A3 scaled down: {epochs} epochs at {res}px, global batch {global_batch}, auto loader")
    # A3 with RandAugment m6, mixup/cutmix and BCE as is; the lr stays the recipe's per-2048 figure, which the
    # trainer scales linearly to the smaller global batch, times 16 because a few epochs need a hot start.
    recipe = override(A3, dict(epochs=epochs, train_res=res, test_res=res, global_batch=global_batch, warmup_epochs=1,
                               lr=A3.lr * 16, model=model))
    summary = train(recipe, out / "data", "auto", model, out / "run", batch_per_gpu=global_batch, device=device,
                    eval_every_epochs=max(1, epochs // 3), log_every_steps=5, progress=not quick)
    chance = 100.0 / classes
    summary_rows.append(("train", f"top-1 {summary['top1']:.1f}% (chance {chance:.0f}%), top-5 {summary['top5']:.1f}%, "
                         f"{summary['img_per_s']:,.0f} img/s, {summary['train_time_s']:.0f} s"))
    report_md = report([results_file, out / "run"], out / "report")
    total = time.perf_counter() - t0
    summary_rows.append(("total", f"{total:.0f} s; plots and tables in {report_md.parent}"))

    width = max(len(k) for k, _ in summary_rows)
    log("")
    log(f"| {'stage'.ljust(width)} | result")
    log(f"|{'-' * (width + 2)}|{'-' * 60}")
    for key, value in summary_rows:
        log(f"| {key.ljust(width)} | {value}")
    result = {"ok": ok, "top1": summary["top1"], "chance": chance, "seconds": total, "out": str(out),
              "rows": summary_rows}
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    return result

