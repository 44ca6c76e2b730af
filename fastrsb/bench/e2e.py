"""End to end: which stage bounds training? Loader alone, augmentation + step alone, and the real
pipeline (loader -> GPU augmentation -> LAMB step), beside timm's own pipeline in the same run.

    fastrsb bench e2e --data OUT [--backend auto] [--model resnet50] [--res 160] [--batch 256] [--steps 30]

The same recipe (A3 by default: RandAugment m6, mixup 0.1 / cutmix 1.0, BCE threshold 0.2, LAMB) runs
through both pipelines:
  * fastrsb: the trainer's own pieces: `make_loader(backend)` (decode + random-resized-crop + flip), the
    GPU augmentation prepared one batch ahead on a side stream (`fastrsb.prefetch.AugmentedBatches`), and
    the trainer's `TrainStep` (multi-tensor LAMB, BCE, the trainer's precision, channels-last, its compile mode);
  * baseline: timm's `create_loader` over the source ImageFolder (PIL, RandAugment on the CPU
    workers, its prefetcher normalising on CUDA), `timm.data.Mixup`, `BinaryCrossEntropy`, timm's Lamb.
Lines: loader alone, step alone (augmentation included for fastrsb), end to end (the one line with a
ratio: the others do different work on the two sides, so timm's rate rides along in `timm`), and a
`bound` line whose `bound_by` and `advice` say which stage limits the end-to-end rate and what to change.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fastrsb.bench.loader import batches_forever
from fastrsb.benchlog import Timer, emit, failure, record
from fastrsb.loaders.imagefolder import use_worker_context
from fastrsb.loaders.layout import read_classes, read_manifest
from fastrsb.runtime import PRECISIONS, autocast_dtype, prepare_device, release_memory, resolve_precision


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=None,
                        help="a folder `fastrsb convert` wrote (default: demo data made and converted in a temp dir)")
    parser.add_argument("--backend", default="auto",
                        help="ffcv, dali, pil or auto; a comma-separated list (dali,pil) takes the first that works "
                             "and names each one that failed")
    parser.add_argument("--recipe", default="a3")
    parser.add_argument("--model", default=None, help="timm model (default resnet50 on CUDA, resnet18 on the CPU)")
    parser.add_argument("--res", type=int, default=None, help="train resolution (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=None, help="per-step batch (default 256 on CUDA, 32 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 30; CPU 5)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                        help="the trainer's --precision, for both pipelines (auto: bf16 on CUDA if the recipe "
                             "uses mixed precision, fp32 on the CPU)")
    parser.add_argument("--compile-mode", default=None, help="the trainer's --compile-mode (default: 'default' on "
                        "CUDA, 'none' on the CPU)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="the model's classes (default: the dataset's; 1000 gives ImageNet's head on demo data)")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="timed steps per measurement of timm's slower pipeline (default: --steps)")
    parser.add_argument("--no-baseline", action="store_true", help="skip timm's pipeline")


def _ensure_data(args) -> Path:
    if args.data:
        return Path(args.data)
    from fastrsb.bench.loader import make_demo

    return make_demo(Path(tempfile.mkdtemp(prefix="fastrsb-e2e-")), per_class=60)[1]


def _rate(fn_batches, n_steps: int, batch: int, device) -> float:
    """img/s over n_steps calls of fn_batches() after 2 untimed ones (the one Timer)."""
    for _ in range(2):
        fn_batches()
    timer = Timer(device).start()
    for _ in range(n_steps):
        fn_batches()
    return n_steps * batch / timer.stop()


def _model(name, num_classes, recipe, device):
    from fastrsb.runtime import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes, recipe.drop_path_rate, recipe.dropout)
    return model.to(device, memory_format=torch.channels_last).train()


def _fastrsb_pipeline(args, data, recipe, device, num_classes):
    """The trainer's pieces: make_loader, the GPU augmentation, AugmentedBatches (side-stream prefetch) and
    TrainStep, with the recipe's loss, LAMB and compile mode."""
    from fastrsb.augment import make_train_augment, recipe_augment_kwargs
    from fastrsb.loaders import make_loader
    from fastrsb.loss import make_loss
    from fastrsb.optim import Lamb, make_param_groups
    from fastrsb.prefetch import AugmentedBatches
    from fastrsb.step import TrainStep, compile_augment

    loader = make_loader(args.backend, data, "train", batch_size=args.batch, res=args.res, device=device,
                         num_workers=args.workers, seed=0, hflip=recipe.hflip, verbose=False)
    augment = make_train_augment(num_classes=num_classes, dtype=autocast_dtype(args.precision),
                                 **recipe_augment_kwargs(recipe))
    compile_augment(augment, device, args.compile_mode)  # as the trainer does
    model = _model(args.model, num_classes, recipe, device)
    optimizer = Lamb(make_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                     compile_update=args.compile_mode != "none")  # as the trainer
    step = TrainStep(model, optimizer, make_loss(recipe), device=device, precision=args.precision,
                     compile_mode=args.compile_mode)
    gen = torch.Generator().manual_seed(0)
    return (loader, lambda it: AugmentedBatches(it, augment, gen, device, count=10**9),
            lambda images, labels: augment(images, labels, gen), lambda x, t: step([(x, t)]))


def _timm_pipeline(args, source: Path, recipe, device, num_classes):
    import timm.loss
    import timm.optim
    from timm.data import Mixup, create_dataset, create_loader

    from fastrsb.bench.step import timm_step
    from fastrsb.optim import make_param_groups

    cuda = device.type == "cuda"
    dataset = create_dataset("", root=str(source), split="train", is_training=True)
    loader = create_loader(dataset, input_size=(3, args.res, args.res), batch_size=args.batch, is_training=True,
                           use_prefetcher=cuda, no_aug=False, scale=recipe.rrc_scale, ratio=recipe.rrc_ratio,
                           hflip=0.5, auto_augment=recipe.rand_augment, interpolation="random",
                           num_workers=args.workers or os.cpu_count(), pin_memory=cuda,
                           device=device, persistent_workers=True)
    use_worker_context(loader)  # its workers from the fork server too, as fastrsb's PIL loader's
    mixup = Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha, label_smoothing=0.0,
                  num_classes=num_classes)
    run_model = _model(args.model, num_classes, recipe, device)
    optimizer = timm.optim.Lamb(make_param_groups(run_model, recipe.weight_decay), lr=recipe.lr)
    loss_fn = timm.loss.BinaryCrossEntropy(target_threshold=recipe.bce_target_thresh)

    def batches():
        while True:
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if images.dtype == torch.uint8:  # no prefetcher on the CPU: timm yields float tensors there
                    images = images.float()
                yield images.contiguous(memory_format=torch.channels_last), labels

    return batches(), (lambda images, labels: mixup(images, labels)), timm_step(run_model, optimizer, loss_fn,
                                                                                device, args.precision)


def _measure(it, augment, step, steps, batch, device, prepare=None) -> dict:
    """Loader alone, augmentation + step alone (on one batch, re-used), and end to end.

    prepare(it): an iterator of ready (x, target) pairs over `it` (fastrsb's AugmentedBatches), used end to end."""
    images, labels = next(it)
    loader_rate = _rate(lambda: next(it), steps, batch, device)
    aug_step_rate = _rate(lambda: step(*augment(images, labels)), steps, batch, device)
    if prepare is not None:
        prepared = prepare(it)
        e2e_rate = _rate(lambda: step(*next(prepared)), steps, batch, device)
    else:
        e2e_rate = _rate(lambda: step(*augment(*next(it))), steps, batch, device)
    return {"loader": loader_rate, "step": aug_step_rate, "e2e": e2e_rate}


def advice(rates: dict) -> tuple[str, str]:
    loader, step, e2e = rates["loader"], rates["step"], rates["e2e"]
    if loader < 0.9 * step:
        return "loader", (f"loader-bound: the loader delivers {loader:,.0f} img/s, the step could take {step:,.0f}; "
                          "add loader workers/cores, use DALI with the hardware decoder on a GPU, store part of the "
                          "beton raw (--write-mode proportion), or lower the train resolution")
    if e2e < 0.8 * min(loader, step):
        return "overlap", (f"neither stage alone: loader {loader:,.0f} and step {step:,.0f} img/s but {e2e:,.0f} together; "
                           "they compete for the same cores or the loader does not prefetch: give the loader its own "
                           "cores or more prefetching")
    return "step", (f"step-bound: the step takes {step:,.0f} img/s and the loader could deliver {loader:,.0f}; "
                    "use torch.compile, bf16, channels-last, a larger batch per GPU, or more GPUs")


def run(args) -> list[dict]:
    from fastrsb.recipes import get_recipe
    from fastrsb.step import default_compile_mode

    device = prepare_device(args.device)  # as the trainer's (cuDNN benchmark mode on CUDA)
    cuda = device.type == "cuda"
    recipe = get_recipe(args.recipe)
    args.precision = resolve_precision(args.precision, device, recipe.mixed_precision)
    args.res = args.res or recipe.train_res
    args.batch = args.batch or (256 if cuda else 32)
    args.steps = args.steps or (30 if cuda else 5)
    args.model = args.model or ("resnet50" if cuda else "resnet18")
    args.compile_mode = args.compile_mode or default_compile_mode(device)
    data = _ensure_data(args)
    num_classes = len(read_classes(data))
    if args.num_classes is not None:
        if args.num_classes < num_classes:
            from fastrsb.errors import FastRSBError

            raise FastRSBError(f"--num-classes {args.num_classes}: {data} has {num_classes} classes; give at least that")
        num_classes = args.num_classes
    config = {"recipe": recipe.name, "model": args.model, "num_classes": num_classes, "res": args.res,
              "batch": args.batch, "steps": args.steps, "baseline_steps": args.baseline_steps or args.steps,
              "backend": args.backend, "precision": args.precision, "compile_mode": args.compile_mode,
              "workers": args.workers or os.cpu_count()}

    # --backend dali,pil: the first that builds and runs is measured; each one that fails is named
    candidates = [b.strip() for b in args.backend.split(",") if b.strip()]
    ours = None
    for n, backend in enumerate(candidates):
        try:
            args.backend = backend
            loader, prepare, augment, step = _fastrsb_pipeline(args, data, recipe, device, num_classes)
            ours = _measure(batches_forever(loader, args.res, 0), augment, step, args.steps, args.batch, device,
                            prepare)
            config["backend"] = loader.backend
            break
        except Exception as e:
            if n == len(candidates) - 1:
                raise
            print(f"# {backend}: skipped, {failure(e)}; trying {candidates[n + 1]}", flush=True)
        finally:
            loader = prepare = augment = step = None
            release_memory()  # our model and its compiled graphs, before the next candidate or timm's pipeline
    base = None
    source = Path(read_manifest(data, "train")["source"])
    if not args.no_baseline and source.is_dir():
        it, augment, step = _timm_pipeline(args, source, recipe, device, num_classes)
        base = _measure(it, augment, step, args.baseline_steps or args.steps, args.batch, device)
        del it, augment, step

    names = {"loader": (f"fastrsb {config['backend']} loader alone", "timm create_loader (PIL, RandAugment on CPU workers)"),
             "step": ("GPU augmentation + multi-tensor LAMB step", "timm Mixup + BCE + Lamb step (eager)"),
             "e2e": ("end to end", "timm's pipeline end to end")}
    out = []
    for key, (name, base_name) in names.items():
        # a ratio only where both sides do the same work: end to end. Alone, timm's loader also runs
        # RandAugment and its step does not, so those timm rates ride along without a ratio.
        same_work = key == "e2e"
        extra = {} if base is None or same_work else {"timm": {"name": base_name, "img_per_s": round(base[key], 1)}}
        rec = record("e2e", f"{name} {args.model} {args.res}px", ours[key], config=config, device=str(device),
                     baseline=(base_name, base[key]) if base and same_work else None, **extra)
        out.append(emit(rec, getattr(args, "out", None)))
    bound, text = advice(ours)
    out.append(emit(record("e2e", f"bound {args.model} {args.res}px", ours["e2e"], config=config, device=str(device),
                           bound_by=bound, advice=text, loader_img_per_s=round(ours["loader"], 1),
                           step_img_per_s=round(ours["step"], 1)), getattr(args, "out", None)))
    print(f"# {text}", flush=True)
    return out

