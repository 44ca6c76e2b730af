"""The subcommands of `fastrsb`: each one's options stand right above the function that runs it.

Every entry of COMMANDS is (name, help, add_arguments, run). `run(args)` turns the parsed options into a
typed call of the library (convert, verify, train, evaluate, bench, ...) and returns the exit status.
Heavy modules (torch, ffcv, DALI) are imported inside `run`, so `fastrsb --help` is fast and works with
no extra installed. Recipe overrides (`key=value`) may stand anywhere on the command line.
"""
from __future__ import annotations

import argparse

from .errors import FastRSBError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _batch_per_gpu(text: str):
    return "auto" if text == "auto" else _positive_int(text)


# ---------------------------------------------------------------------------------------------- demo-data

def _demo_data_args(p):
    p.add_argument("out", help="output folder")
    p.add_argument("--classes", type=_positive_int, default=10)
    p.add_argument("--train-per-class", type=_positive_int, default=60)
    p.add_argument("--val-per-class", type=_positive_int, default=20)
    p.add_argument("--min-size", type=_positive_int, default=96, help="smallest short side, px")
    p.add_argument("--max-size", type=_positive_int, default=256, help="largest short side, px")
    p.add_argument("--oddities", action="store_true",
                   help="add CMYK, grayscale, PNG-named-JPEG, palette, EXIF-rotated, truncated, empty, "
                        "non-image and very large files to train/")
    p.add_argument("--large-side", type=_positive_int, default=10000, help="long side of the very large oddity, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-copies", type=_positive_int, default=1,
                   help="store each train image N times under different names (hard links): a larger train split "
                        "for throughput benchmarks without rendering every image")


def _demo_data(args) -> int:
    from .demo_data import make_demo_data

    out = make_demo_data(args.out, num_classes=args.classes, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, min_size=args.min_size, max_size=args.max_size,
                         oddities=args.oddities, large_side=args.large_side, seed=args.seed,
                         train_copies=args.train_copies)
    print(f"wrote demo ImageFolder dataset to {out} (train/, val/; {args.classes} classes)")
    return 0


# ---------------------------------------------------------------------------------------------- digits-data

def _digits_data_args(p):
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=_positive_int, default=64, help="side of the upsampled images, px")
    p.add_argument("--val-images", type=_positive_int, default=300, help="images in val/ (stratified); the rest train")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")


def _digits_data(args) -> int:
    from .digits_data import make_digits_data

    out = make_digits_data(args.out, size=args.size, val_images=args.val_images, seed=args.seed)
    print(f"wrote the UCI digits (scikit-learn's load_digits) as an ImageFolder dataset to {out} (train/, val/)")
    return 0


# ---------------------------------------------------------------------------------------------- recipe

def _recipe_args(p):
    p.add_argument("name", help="a1, a2 or a3")


def _recipe(args) -> int:
    from .recipes import get_recipe, override

    print(override(get_recipe(args.name), args.overrides).to_json())
    return 0


# ---------------------------------------------------------------------------------------------- convert

def _convert_args(p):
    p.add_argument("src", help="dataset root with train/ and val/ class folders (or one split's class folders with "
                   "--split), or the folder holding ImageNet as downloaded (README: ImageNet as downloaded)")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="beton,dali", help="comma-separated: beton, dali (default: both)")
    p.add_argument("--layout", default="auto",
                   help="what SRC holds: auto (default: found out), imagefolder, or ImageNet as downloaded: "
                        "imagenet-tars (the official tars), kaggle, hf-parquet, webdataset")
    p.add_argument("--split", default=None, help="SRC holds one split's class folders; name it (e.g. train)")
    p.add_argument("--max-side", type=int, default=500, help="longest side after resizing, px (FFCV max_resolution)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images")
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion"],
                   help="beton image storage: jpg (same JPEG bytes as the shards), raw pixels, or a "
                        "proportion stored as JPEG (--compress-probability)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="share stored as JPEG in proportion mode")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per DALI shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="the train split is written in an order shuffled with this seed, so that shards mix "
                        "classes; -1 keeps sorted order")
    p.add_argument("--reencode-all", action="store_true",
                   help="re-encode every image (default: keep a JPEG's original bytes where they decode as "
                        "baseline or progressive RGB/gray JPEG, and, for train, fit --max-side)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _convert(args) -> int:
    from .convert import convert

    convert(args.src, args.out, formats=[f.strip() for f in args.format.split(",") if f.strip()], split=args.split,
            max_side=args.max_side, quality=args.quality, write_mode=args.write_mode,
            compress_probability=args.compress_probability, shard_size=args.shard_size, workers=args.workers,
            shuffle_seed=args.shuffle_seed, keep_jpeg=not args.reencode_all, progress=not args.no_progress,
            layout_name=args.layout)
    return 0


# ---------------------------------------------------------------------------------------------- verify

def _verify_args(p):
    p.add_argument("out", help="the folder `fastrsb convert` wrote")
    p.add_argument("--quick", action="store_true", help="checksums, counts and labels only; do not decode images")


def _verify(args) -> int:
    from .verify import verify

    return 0 if verify(args.out, decode=not args.quick) else 1


# ---------------------------------------------------------------------------------------------- train

def _train_args(p):
    p.add_argument("--recipe", default="a3", help="a1, a2 or a3 (default a3)")
    p.add_argument("--data", required=True, help="the folder `fastrsb convert` wrote")
    p.add_argument("--loader", default="auto",
                   help="loader backend: auto, dali, ffcv or pil; or timm: the reference, the recipe trained by "
                        "timm's own loader, Mixup, BCE, Lamb and scheduler over the source images "
                        "(fastrsb/timm_reference.py)")
    p.add_argument("--model", default=None, help="timm model name (default: the recipe's, resnet50)")
    p.add_argument("--out", default=None, help="run folder (default runs/RECIPE-MODEL)")
    p.add_argument("--batch-per-gpu", type=_batch_per_gpu, default="auto",
                   help="micro-batch per GPU; auto (default): on CUDA the largest that fits, probed at start-up "
                        "(on the CPU 256); accumulation makes up the global batch")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    # no choices= here: fastrsb.step.COMPILE_MODES checks the mode, and importing it would load torch for --help
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the model: none, default, reduce-overhead, max-autotune or "
                        "max-autotune-no-cudagraphs (default: 'default' on CUDA, 'none' on the CPU)")
    p.add_argument("--eval-every", type=_positive_int, default=10, help="evaluate every N epochs (and at the end)")
    p.add_argument("--log-every", type=_positive_int, default=50, help="log every N optimizer steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (at an epoch's end or mid-epoch)")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue if --out holds a checkpoint, else start: the same command for the first "
                        "launch and every relaunch (torchrun --max-restarts, requeued jobs)")
    p.add_argument("--checkpoint-every-steps", type=_positive_int, default=None,
                   help="also checkpoint every N optimizer steps within an epoch (SIGTERM and SIGUSR1 always "
                        "checkpoint the step in progress and stop, exit status 75)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a collective waits for the other processes before the run stops (torchrun; "
                        "default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="loader threads/processes (default: all cores)")
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="DALI on a GPU: the share of JPEGs for the hardware decoder, 0-1 (default 1.0)")
    p.add_argument("--lamb-max-grad-norm", type=float, default=1.0,
                   help="LAMB's global gradient-norm clip, as in timm (0: off, as in the paper's algorithm)")
    p.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at step 0 of the linear warmup")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    tensorboard = p.add_mutually_exclusive_group()
    tensorboard.add_argument("--tensorboard", default=None, metavar="DIR",
                             help="write TensorBoard events here (default: OUT/tensorboard when the tensorboard "
                                  "extra is installed: pip install 'fastrsb[tensorboard]')")
    tensorboard.add_argument("--no-tensorboard", action="store_false", dest="tensorboard_on",
                             help="write no TensorBoard events")


def _train(args) -> int:
    from .recipes import get_recipe, override
    from .train import train

    recipe = override(get_recipe(args.recipe), args.overrides)
    model_name = args.model or recipe.model
    if args.loader == "timm":
        return _train_reference(args, recipe, model_name)
    summary = train(recipe, args.data, args.loader, model_name, args.out or f"runs/{recipe.name}-{model_name}",
                    batch_per_gpu=args.batch_per_gpu, device=args.device, precision=args.precision,
                    compile_mode=args.compile_mode, eval_every_epochs=args.eval_every, log_every_steps=args.log_every,
                    resume="auto" if args.auto_resume else args.resume, seed=args.seed, num_workers=args.workers,
                    hw_decoder_load=args.hw_decoder_load, lamb_max_grad_norm=args.lamb_max_grad_norm or None,
                    warmup_lr=args.warmup_lr, min_lr=args.min_lr, progress=not args.no_progress,
                    checkpoint_every_steps=args.checkpoint_every_steps, dist_timeout_s=args.dist_timeout,
                    tensorboard=args.tensorboard if args.tensorboard_on else False)
    if summary.get("stopped_by"):
        from .preempt import PREEMPTED_EXIT

        return PREEMPTED_EXIT
    return 0


def _train_reference(args, recipe, model_name) -> int:
    from .timm_reference import train_reference

    train_reference(recipe, args.data, model_name, args.out or f"runs/{recipe.name}-{model_name}-timm",
                    batch_per_gpu=args.batch_per_gpu, device=args.device, precision=args.precision,
                    compile_mode=args.compile_mode, eval_every_epochs=args.eval_every, log_every_steps=args.log_every,
                    resume="auto" if args.auto_resume else args.resume, seed=args.seed, num_workers=args.workers,
                    lamb_max_grad_norm=args.lamb_max_grad_norm or None, warmup_lr=args.warmup_lr,
                    min_lr=args.min_lr, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------------------------- eval

def _eval_args(p):
    p.add_argument("source", help="run folder, checkpoint.pt, or model.pt (with --model and --num-classes)")
    p.add_argument("--data", required=True, help="the folder `fastrsb convert` wrote")
    p.add_argument("--loader", default="auto", help="loader backend: auto, dali, ffcv or pil")
    p.add_argument("--model", default=None, help="timm model name (default: from the run)")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="default: from the run")
    p.add_argument("--res", type=_positive_int, default=None, help="default: the recipe's test_res, else 224")
    p.add_argument("--crop-pct", type=float, default=None, help="default: the recipe's test_crop_pct, else 0.95")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--workers", type=int, default=None)


def _eval(args) -> int:
    from .evaluate import evaluate

    evaluate(args.source, args.data, args.loader, model_name=args.model, num_classes=args.num_classes, res=args.res,
             crop_pct=args.crop_pct, batch_size=args.batch_size, device=args.device, precision=args.precision,
             num_workers=args.workers)
    return 0


# ---------------------------------------------------------------------------------------------- demo

def _demo_args(p):
    p.add_argument("--out", default="demo", help="working folder (default: ./demo)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (what CI runs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--model", default=None, help="timm model (default: resnet10t on the CPU, resnet18 on a GPU)")
    p.add_argument("--epochs", type=_positive_int, default=None)


def _demo(args) -> int:
    from .demo import demo

    result = demo(args.out, quick=args.quick, device=args.device, model=args.model, epochs=args.epochs)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------- bench

def _bench_args(p, with_benchmarks: bool = True):
    from .bench import BENCHMARKS, describe, get

    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        if not with_benchmarks:  # their options import torch: only when `bench` is the command
            sub.add_parser(name, help=f"{name} throughput (fastrsb bench {name} --help)")
            continue
        module = get(name)
        b = sub.add_parser(name, help=describe(module), description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(b)
        b.add_argument("--out", default=None, help="append the JSON lines to this file too")


def _bench(args) -> int:
    from .bench import get

    get(args.benchmark).run(args)
    return 0


# ---------------------------------------------------------------------------------------------- report

def _report_args(p):
    p.add_argument("results", nargs="+", help="result .jsonl files, run folders or folders holding them")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")


def _report(args) -> int:
    from .report import report

    path = report(args.results, args.out)
    print(f"wrote {path} and its plots")
    return 0


# ---------------------------------------------------------------------------------------------- sweep

def _sweep_args(p):
    p.add_argument("--recipe", default="a3")
    p.add_argument("--seeds", required=True, help="e.g. 1-5, or 1,3,7")
    p.add_argument("--data", required=True, help="a folder `fastrsb convert` wrote")
    p.add_argument("--loader", default="auto")
    p.add_argument("--pipelines", default=None,
                   help="comma-separated loaders, e.g. dali,ffcv,pil,timm: every seed of each, into OUT/PIPELINE/"
                        "seed-N, each compared with timm's reference pipeline (Welch's 95%% interval); "
                        "instead of --loader")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--parallel", default="auto", choices=["auto", "sequential", "per-gpu"],
                   help="per-gpu: one seed per visible GPU at a time (default when there are several)")
    p.add_argument("--batch-per-gpu", type=_batch_per_gpu, default=None)
    p.add_argument("--device", default=None)


def _sweep(args) -> int:
    from .recipes import get_recipe, override
    from .sweep import parse_seeds, sweep

    override(get_recipe(args.recipe), args.overrides)  # refuse bad overrides before starting any seed
    train_args = []
    if args.batch_per_gpu:
        train_args += ["--batch-per-gpu", str(args.batch_per_gpu)]
    if args.device:
        train_args += ["--device", args.device]
    pipelines = None
    if args.pipelines is not None:
        if args.loader != "auto":
            raise FastRSBError("give --pipelines or --loader, not both")
        pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    sweep(args.recipe, parse_seeds(args.seeds), args.data, args.out, loader=args.loader, pipelines=pipelines,
          model=args.model, overrides=args.overrides, train_args=train_args, parallel=args.parallel)
    return 0


# (name, help, add_arguments, run, takes recipe overrides)
COMMANDS = (
    ("demo-data", "write a built-in ImageFolder dataset (train/, val/)", _demo_data_args, _demo_data, False),
    ("digits-data", "write scikit-learn's UCI digits (1,797 real 8x8 images) as an ImageFolder dataset",
     _digits_data_args, _digits_data, False),
    ("recipe", "print an RSB recipe (a1, a2, a3) as JSON, with key=value overrides", _recipe_args, _recipe, True),
    ("convert", "convert an ImageFolder dataset to FFCV .beton and DALI webdataset shards", _convert_args, _convert,
     False),
    ("verify", "re-read a converted dataset through FFCV and DALI and check it", _verify_args, _verify, False),
    ("train", "train a timm model with an RSB recipe at a fixed global batch (torchrun for DDP); "
              "key=value overrides the recipe", _train_args, _train, True),
    ("eval", "top-1/top-5 of a run folder, checkpoint or model.pt on the val split", _eval_args, _eval, False),
    ("demo", "the whole pipeline on built-in data: data, convert, verify, loader benchmark, a short training "
             "run, summary", _demo_args, _demo, False),
    ("bench", "benchmarks, each against its baseline in the same run (JSON lines)", _bench_args, _bench, False),
    ("report", "plots (PNG) and a markdown table from benchmark results and training runs", _report_args, _report,
     False),
    ("sweep", "one recipe with several seeds (and pipelines, against timm's); mean, std, min, max of the final "
              "accuracy; key=value overrides",
     _sweep_args, _sweep, True),
)


def check_overrides(command: str, extra: list[str]) -> list[str]:
    """The key=value words of the command line; anything else left over is an error naming it."""
    takes = {name: takes for name, _, _, _, takes in COMMANDS}
    unknown = [w for w in extra if not (takes.get(command) and "=" in w and not w.startswith("-"))]
    if unknown:
        hint = " (recipe overrides are key=value)" if takes.get(command) else ""
        raise FastRSBError(f"unrecognized arguments: {' '.join(unknown)}{hint}; see fastrsb {command} --help")
    return list(extra)
