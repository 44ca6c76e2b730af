"""Does each part of the GPU path work on this machine, before anything is timed?

In seconds, three checks, each on its own so that one failure names itself and stops nothing else:
- `dali`: a one-batch DALI pipeline with the loader's decoder arguments (mixed, nvJPEG, on CUDA; the CPU
  decoder otherwise) is built and run on a JPEG made here;
- `augment`: one call of the trainer's augmentation (`bench.loader.train_augment`: compiled on CUDA, as the
  trainer compiles it) on a small uint8 batch;
- `step`: one step of the trainer's `TrainStep` at a small batch (compiled on CUDA), through
  `bench.step.measure`.
Each check is a JSON line (benchmark "preflight", value 1 for ok and 0 for failed or skipped, with the
reason). `--env-file F` writes their outcome as shell assignments for `benchmarks/gpu_suite.sh`, which
chooses the later stages' backends and compile modes from them; it is rewritten after each check, so a
preflight stopped by its time limit still reports the checks it finished. The exit status is 0 whatever failed: a
failure is a result here, never a traceback.
"""
from __future__ import annotations

import argparse
import io
import time

import torch

from fastrsb.benchlog import emit, failure, record


def _jpeg(size: int = 96) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size + 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def check_dali(device: torch.device, batch: int = 4) -> str:
    """One batch through a DALI pipeline with the loader's decoder: the decoded shape, as text."""
    import numpy as np

    from fastrsb.loaders.registry import usable

    if not usable("dali"):
        raise LookupError("DALI is not installed (pip install nvidia-dali-cuda120)")
    from nvidia.dali import Pipeline, fn, types

    from fastrsb.loaders.dali_loader import decoder_arguments

    mixed = device.type == "cuda"
    jpeg = np.frombuffer(_jpeg(), np.uint8)
    pipe = Pipeline(batch_size=batch, num_threads=2, device_id=(device.index or 0) if mixed else None, seed=0,
                    exec_dynamic=True)
    with pipe:
        jpegs = fn.external_source(source=lambda: [jpeg] * batch, batch=True, dtype=types.UINT8)
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder_arguments(mixed, hw_decoder_load=1.0))
        pipe.set_outputs(fn.resize(images, size=[32, 32], antialias=True))
    pipe.build()
    (out,) = pipe.run()
    shape = out.as_tensor().shape()
    if list(shape) != [batch, 32, 32, 3]:
        raise RuntimeError(f"DALI decoded a batch of shape {list(shape)}, expected {[batch, 32, 32, 3]}")
    return f"{'mixed (nvJPEG)' if mixed else 'cpu'} decode + resize, batch {batch}"


def check_augment(device: torch.device, batch: int = 8, res: int = 64) -> str:
    from fastrsb.bench.loader import train_augment

    augment = train_augment(10, device)
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    x, y = augment(images, torch.arange(batch, device=device) % 10, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if tuple(x.shape) != (batch, 3, res, res) or not torch.isfinite(x.float()).all():
        raise RuntimeError(f"the augmentation returned {tuple(x.shape)} {x.dtype}, not a finite ({batch}, 3, {res}, {res})")
    return f"{'compiled' if augment.compiled else 'eager'}, batch {batch} at {res} px"


def check_step(device: torch.device, compile_mode: str, batch: int = 8, res: int = 64) -> str:
    from fastrsb.bench.step import measure
    from fastrsb.runtime import resolve_precision

    args = argparse.Namespace(model="test_resnet", num_classes=10, drop_path=0.0, batch_per_gpu=batch, warmup=0,
                              repeats=1, precision=resolve_precision("auto", device, True))
    result = measure("fastrsb", args, res, batch, device, compile_mode)
    return f"test_resnet compile {compile_mode}, batch {batch} at {res} px, first step {result['first_step_s']:.1f} s"


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--env-file", default=None, help="write the outcome as shell assignments (for gpu_suite.sh)")


def run(args) -> dict[str, bool]:
    from fastrsb.runtime import prepare_device
    from fastrsb.step import default_compile_mode

    device = prepare_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = default_compile_mode(device)
    checks = {"dali": lambda: check_dali(device), "augment": lambda: check_augment(device),
              "step": lambda: check_step(device, mode)}
    ok = {}
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            detail, ok[name] = check(), True
        except Exception as e:  # any failure is this check's result: named, and the next check runs
            detail, ok[name] = failure(e), False
        seconds = time.perf_counter() - t0
        print(f"# preflight {name}: {'ok' if ok[name] else 'FAILED, skipped by later stages'} ({seconds:.1f} s): "
              f"{detail}", flush=True)
        emit(record("preflight", name, 1.0 if ok[name] else 0.0, unit="ok", device=str(device),
                    config={"check": name, "compile_mode": mode if name != "dali" else None},
                    detail=detail, seconds=round(seconds, 2)), args.out, echo=False)
        if args.env_file:  # after each check, so that a preflight cut short keeps what it found
            write_env(args.env_file, ok)
    return ok


def write_env(path, ok: dict[str, bool]) -> None:
    """`preflight_NAME=ok|failed` per check done; a check not reached is absent (the suite reads it as
    unknown and goes ahead as if it had worked)."""
    text = "".join(f"preflight_{name}={'ok' if good else 'failed'}\n" for name, good in ok.items())
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    import os

    os.replace(tmp, path)
