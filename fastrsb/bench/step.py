"""Training-step throughput: the trainer's own step (`fastrsb.step.TrainStep`: multi-tensor LAMB, BCE with
the recipe's threshold, LAMB's clip, GradScaler, channels-last, the trainer's precision (bf16 autocast on
CUDA), torch.compile on CUDA) against timm's eager `Lamb` step, measured in the same run.

    fastrsb bench step                                        # same as benchmarks/step_throughput.py
    python benchmarks/step_throughput.py                      # resnet50, 160 and 224 px, batch 256 and 2048
    python benchmarks/step_throughput.py --quick              # CPU smoke run: tiny model, tiny images
    python benchmarks/step_throughput.py --res 160 --batch 2048 --batch-per-gpu 2048 --out results.jsonl

The batch is synthetic and already on the device (normalised channels-last images, dense soft
targets), and both models have A3's stochastic depth (none; `--drop-path`), so the figure is the step alone, with gradient accumulation when `batch` exceeds
`--batch-per-gpu` (one optimizer step per `batch` images). Each repeat times one optimizer step; the
median of `--repeats` follows `--warmup` untimed steps (which include compilation). One JSON line per
(res, batch), in the format of fastrsb/benchlog.py; the baseline is timm's `Lamb` in eager mode with its
default code path (timm >= 1.0.30 picks its own foreach path on CUDA) and timm's BinaryCrossEntropy, and
with `--timm-per-param` also its per-parameter path (the one older timm releases use). `--compile-mode` picks the compile mode of fastrsb's step (the
trainer's `--compile-mode`); `--compile-modes a,b,c` measures several in one run.

Goal (issue 9): >= 14,000 img/s for ResNet-50 at 160 px, batch 2048, on one H100. Not yet measured:
no GPU was available when this was written; CPU figures from `--quick` only show that the script runs.
"""
from __future__ import annotations

import statistics

import torch

from fastrsb.benchlog import Timer, emit, record, time_calls
from fastrsb.optim import Lamb, make_param_groups
from fastrsb.runtime import PRECISIONS, autocast, create_model, prepare_device, release_memory, resolve_precision
from fastrsb.step import COMPILE_MODES, TrainStep, default_compile_mode


def time_optimizer_only(optimizer, model, device, repeats: int) -> float:
    """Median seconds of optimizer.step() alone, with gradients in place."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = time_calls(optimizer.step, device, warmup=2, repeats=repeats)
    optimizer.zero_grad(set_to_none=True)
    return statistics.median(times)


def timm_step(model, optimizer, loss_fn, device: torch.device, precision: str):
    """The baseline's step, as timm's train.py takes it: eager, autocast forward, the loss scaled by its
    NativeScaler (active for fp16 only), one optimizer step. `step(images, targets, accum_steps=1)`
    accumulates over `accum_steps` passes of the batch; `bench e2e` takes it too."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(images, targets, accum_steps: int = 1) -> None:
        for _ in range(accum_steps):
            with autocast(device, precision):
                logits = model(images)
            scaler.scale(loss_fn(logits, targets) / accum_steps).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(kind: str, args, res: int, batch: int, device: torch.device, compile_mode: str = "none") -> dict:
    import timm.loss
    import timm.optim

    micro = min(batch, args.batch_per_gpu)
    if batch % micro:
        from fastrsb.errors import FastRSBError

        raise FastRSBError(f"batch {batch} is not a multiple of --batch-per-gpu {micro}")
    accum_steps = batch // micro
    torch.manual_seed(0)
    model = create_model(args.model, args.num_classes, args.drop_path).to(device, memory_format=torch.channels_last)
    model.train()
    groups = make_param_groups(model, 0.02)
    images = torch.randn(micro, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.rand(micro, args.num_classes, device=device)
    if kind == "fastrsb":
        from fastrsb.loss import make_loss
        from fastrsb.recipes import A3

        optimizer = Lamb(groups, lr=8e-3, compile_update=compile_mode != "none")  # as the trainer
        train_step = TrainStep(model, optimizer, make_loss(A3), device=device, precision=args.precision,
                               accum_steps=accum_steps, grad_clip=A3.grad_clip, compile_mode=compile_mode)

        def step():
            train_step((images, targets) for _ in range(accum_steps))
    else:
        import inspect

        # timm >= 1.0.30 has `foreach` (None: its own choice); older releases only have the per-parameter path
        has_foreach = "foreach" in inspect.signature(timm.optim.Lamb).parameters
        foreach = {"foreach": None if kind == "timm" else False} if has_foreach else {}
        optimizer = timm.optim.Lamb(groups, lr=8e-3, **foreach)
        loss_fn = timm.loss.BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2)
        baseline_step = timm_step(model, optimizer, loss_fn, device, args.precision)

        def step():
            baseline_step(images, targets, accum_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer(device).start()
    step()  # first step: compilation, state allocation
    first_step_s = timer.stop()  # includes compilation
    times = time_calls(step, device, args.warmup, args.repeats)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    opt_s = time_optimizer_only(optimizer, model, device, args.repeats)
    median_s = statistics.median(times)
    result = {"img_per_s": batch / median_s, "step_s_all": times, "optimizer_step_ms": 1e3 * opt_s,
              "first_step_s": first_step_s, "accum_steps": accum_steps, "micro_batch": micro, "peak_mem_gib": peak_gib}
    del model, optimizer, step, images, targets
    release_memory()
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="timm model (default resnet50; --quick: test_resnet)")
    parser.add_argument("--res", default=None, help="comma-separated resolutions (default 160,224; --quick 32,48)")
    parser.add_argument("--batch", default=None, help="comma-separated global batches (default 256,2048; --quick 16,32)")
    parser.add_argument("--batch-per-gpu", type=int, default=None,
                        help="largest micro-batch (default 1024; --quick 16): larger batches accumulate")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--drop-path", type=float, default=None,
                        help="stochastic depth of both models (default: A3's, none; A1/A2 use 0.05)")
    parser.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                        help="the trainer's --precision for both steps (auto: bf16 on CUDA, fp32 on the CPU; fp16 "
                             "with a GradScaler on both sides)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 5; --quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; --quick 5)")
    parser.add_argument("--compile-modes", default=None,
                        help=f"comma-separated compile modes of fastrsb's step to measure, from {', '.join(COMPILE_MODES)} "
                             "(default: 'default' on CUDA, 'none' on the CPU)")
    parser.add_argument("--timm-per-param", action="store_true", help="also time timm's per-parameter Lamb path")
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny defaults for a CPU smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (--quick default 1)")


def run(args) -> None:
    device = prepare_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    q = args.quick
    args.model = args.model or ("test_resnet" if q else "resnet50")
    if q:
        args.num_classes = 100 if args.num_classes == 1000 else args.num_classes
    resolutions = [int(r) for r in (args.res or ("32,48" if q else "160,224")).split(",")]
    batches = [int(b) for b in (args.batch or ("16,32" if q else "256,2048")).split(",")]
    args.batch_per_gpu = args.batch_per_gpu or (16 if q else 1024)
    from fastrsb.recipes import A3

    if args.drop_path is None:
        args.drop_path = A3.drop_path_rate
    args.precision = resolve_precision(args.precision, device, A3.mixed_precision)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.repeats = args.repeats or (5 if q else 10)
    modes = (args.compile_modes or default_compile_mode(device)).split(",")
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        from fastrsb.errors import FastRSBError

        raise FastRSBError(f"--compile-modes: unknown {', '.join(bad)}; choose from {', '.join(COMPILE_MODES)}")
    if args.threads or (q and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)  # a shared small CPU: 1 thread gives stable figures

    # Compiled modes first and timm's baseline after them: a run cut short by a time limit keeps the figure
    # it exists for. Each of ours is written at once as a provisional line (no baseline yet), then again with
    # its same-run baseline; `fastrsb report` shows the provisional line only when the final one is missing.
    modes = sorted(modes, key=lambda m: m == "none")
    for res in resolutions:
        for batch in batches:
            measured = []
            for mode in modes:
                ours = measure("fastrsb", args, res, batch, device, mode)
                config = {"model": args.model, "res": res, "batch": batch, "micro_batch": ours["micro_batch"],
                          "accum_steps": ours["accum_steps"], "precision": args.precision, "channels_last": True,
                          "compile_mode": mode, "num_classes": args.num_classes, "drop_path": args.drop_path,
                          "warmup": args.warmup,
                          "repeats": args.repeats, "threads": torch.get_num_threads() if device.type == "cpu" else None}
                name = f"fastrsb step {args.model} {res}px batch {batch} compile {mode}"
                fields = dict(config=config, device=str(device), step_s=ours["step_s_all"],
                              optimizer_step_ms=round(ours["optimizer_step_ms"], 3),
                              first_step_s=round(ours["first_step_s"], 2), peak_mem_gib=ours["peak_mem_gib"])
                emit(record("step", name, ours["img_per_s"], provisional=True, **fields), args.out)
                measured.append((name, ours["img_per_s"], fields))
            base = measure("timm", args, res, batch, device)
            extra = {}
            if args.timm_per_param:
                per_param = measure("timm-per-param", args, res, batch, device)
                extra["baseline_per_param"] = {"name": "timm Lamb eager, foreach=False (per parameter)",
                                               "value": round(per_param["img_per_s"], 3),
                                               "optimizer_step_ms": per_param["optimizer_step_ms"]}
            for name, value, fields in measured:
                emit(record("step", name, value,
                            baseline=("timm Lamb eager (default path) + timm BCE", base["img_per_s"]),
                            baseline_optimizer_step_ms=round(base["optimizer_step_ms"], 3),
                            baseline_peak_mem_gib=base["peak_mem_gib"], **fields, **extra), args.out)
