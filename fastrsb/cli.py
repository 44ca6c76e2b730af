"""The `fastrsb` command line (also `python -m fastrsb`).

Each subcommand imports its heavy modules (torch, ffcv, DALI) itself, so `fastrsb --help` is fast and
works with no extra installed.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_demo_data(args) -> int:
    from .demo_data import make_demo_data

    out = make_demo_data(
        args.out,
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        min_size=args.min_size,
        max_size=args.max_size,
        oddities=args.oddities,
        large_side=args.large_side,
        seed=args.seed,
    )
    print(f"wrote demo ImageFolder dataset to {out} (train/, val/; {args.classes} classes)")
    return 0


def _cmd_recipe(args) -> int:
    from .recipes import get_recipe, override

    print(override(get_recipe(args.name), args.overrides).to_json())
    return 0


def _cmd_convert(args) -> int:
    from .convert import convert

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    convert(
        args.src,
        args.out,
        formats=formats,
        split=args.split,
        max_side=args.max_side,
        quality=args.quality,
        write_mode=args.write_mode,
        compress_probability=args.compress_probability,
        shard_size=args.shard_size,
        workers=args.workers,
        shuffle_seed=args.shuffle_seed,
        progress=not args.no_progress,
    )
    return 0


def _cmd_verify(args) -> int:
    from .verify import verify

    return 0 if verify(args.out, decode=not args.quick) else 1


def _cmd_train(args) -> int:
    from .errors import FastRSBError
    from .recipes import get_recipe, override
    from .train import train

    try:
        recipe = override(get_recipe(args.recipe), args.overrides)
    except ValueError as e:
        raise FastRSBError(str(e)) from None
    model_name = args.model or recipe.model
    train(
        recipe,
        args.data,
        args.loader,
        model_name,
        args.out or f"runs/{recipe.name}-{model_name}",
        batch_per_gpu=args.batch_per_gpu,
        device=args.device,
        precision=args.precision,
        compile_model=args.compile,
        eval_every_epochs=args.eval_every,
        log_every_steps=args.log_every,
        resume=args.resume,
        seed=args.seed,
        num_workers=args.workers,
        lamb_max_grad_norm=args.lamb_max_grad_norm or None,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        progress=not args.no_progress,
    )
    return 0


def _cmd_eval(args) -> int:
    from .train import evaluate

    evaluate(args.source, args.data, args.loader, model_name=args.model, num_classes=args.num_classes, res=args.res,
             crop_pct=args.crop_pct, batch_size=args.batch_size, device=args.device, precision=args.precision,
             num_workers=args.workers)
    return 0


def _cmd_demo(args) -> int:
    from .demo import demo

    result = demo(args.out, quick=args.quick, device=args.device, model=args.model, epochs=args.epochs)
    return 0 if result["ok"] else 1


def _cmd_bench(args) -> int:
    from .bench import get

    get(args.benchmark).run(args)
    return 0


def _cmd_report(args) -> int:
    from .report import report

    path = report(args.results, args.out)
    print(f"wrote {path} and its plots")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import parse_seeds, sweep

    train_args = []
    if args.batch_per_gpu:
        train_args += ["--batch-per-gpu", str(args.batch_per_gpu)]
    if args.device:
        train_args += ["--device", args.device]
    sweep(args.recipe, parse_seeds(args.seeds), args.data, args.out, loader=args.loader, model=args.model,
          overrides=args.overrides, train_args=train_args, parallel=args.parallel)
    return 0


def build_parser(with_benchmarks: bool = True) -> argparse.ArgumentParser:
    """with_benchmarks=False leaves out the benchmarks' own options, whose modules import torch."""
    parser = argparse.ArgumentParser(prog="fastrsb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write a built-in ImageFolder dataset (train/, val/)")
    p.add_argument("out", help="output folder")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--min-size", type=int, default=96, help="smallest short side, px")
    p.add_argument("--max-size", type=int, default=256, help="largest short side, px")
    p.add_argument("--oddities", action="store_true",
                   help="add CMYK, grayscale, PNG-named-JPEG, palette, EXIF-rotated, truncated, empty, "
                        "non-image and very large files to train/")
    p.add_argument("--large-side", type=int, default=10000, help="long side of the very large oddity, px")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("recipe", help="print an RSB recipe (a1, a2, a3) as JSON, with overrides")
    p.add_argument("name", help="a1, a2 or a3")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=10")
    p.set_defaults(func=_cmd_recipe)

    p = sub.add_parser("convert", help="convert an ImageFolder dataset to FFCV .beton and DALI webdataset shards")
    p.add_argument("src", help="dataset root with train/ and val/ class folders (or one split's class folders with --split)")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="beton,dali", help="comma-separated: beton, dali (default: both)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("verify", help="re-read a converted dataset through FFCV and DALI and check it")
    p.add_argument("out", help="the folder `fastrsb convert` wrote")
    p.add_argument("--quick", action="store_true", help="checksums, counts and labels only; do not decode images")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("train", help="train a timm model with an RSB recipe at a fixed global batch (torchrun for DDP)")
    p.add_argument("--recipe", default="a3", help="a1, a2 or a3 (default a3)")
    p.add_argument("--data", required=True, help="the folder `fastrsb convert` wrote")
    p.add_argument("--loader", default="auto", choices=["auto", "dali", "ffcv", "pil"], help="loader backend")
    p.add_argument("--model", default=None, help="timm model name (default: the recipe's, resnet50)")
    p.add_argument("--out", default=None, help="run folder (default runs/RECIPE-MODEL)")
    p.add_argument("--batch-per-gpu", type=int, default=256,
                   help="largest micro-batch that fits one GPU; accumulation makes up the global batch")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="no torch.compile (default: compile on CUDA)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=50, help="log every N optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="loader threads/processes (default: all cores)")
    p.add_argument("--lamb-max-grad-norm", type=float, default=1.0,
                   help="LAMB's global gradient-norm clip, as in timm (0: off, as in the paper's algorithm)")
    p.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at step 0 of the linear warmup")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="recipe key=value, e.g. epochs=10 global_batch=1024")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a run folder, checkpoint or model.pt on the val split")
    p.add_argument("source", help="run folder, checkpoint.pt, or model.pt (with --model and --num-classes)")
    p.add_argument("--data", required=True, help="the folder `fastrsb convert` wrote")
    p.add_argument("--loader", default="auto", choices=["auto", "dali", "ffcv", "pil"], help="loader backend")
    p.add_argument("--model", default=None, help="timm model name (default: from the run)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the run")
    p.add_argument("--res", type=int, default=None, help="default: the recipe's test_res, else 224")
    p.add_argument("--crop-pct", type=float, default=None, help="default: the recipe's test_crop_pct, else 0.95")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on built-in data: data, convert, verify, loader "
                                     "benchmark, a short training run, summary")
    p.add_argument("--out", default="demo", help="working folder (default: ./demo)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (what CI runs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--model", default=None, help="timm model (default: resnet10t on the CPU, resnet18 on a GPU)")
    p.add_argument("--epochs", type=int, default=None)
    p.set_defaults(func=_cmd_demo)

    from .bench import BENCHMARKS, get

    p = sub.add_parser("bench", help="benchmarks, each against its baseline in the same run (JSON lines)")
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        if with_benchmarks:
            module = get(name)
            b = bench_sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(b)
            b.add_argument("--out", default=None, help="append the JSON lines to this file too")
        else:
            bench_sub.add_parser(name, help=f"{name} throughput (fastrsb bench {name} --help)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="plots (PNG) and a markdown table from benchmark results and training runs")
    p.add_argument("results", nargs="+", help="result .jsonl files, run folders or folders holding them")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("sweep", help="one recipe with several seeds; mean, std, min, max of the final accuracy")
    p.add_argument("--recipe", default="a3")
    p.add_argument("--seeds", required=True, help="e.g. 1-5, or 1,3,7")
    p.add_argument("--data", required=True, help="a folder `fastrsb convert` wrote")
    p.add_argument("--loader", default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--parallel", default="auto", choices=["auto", "sequential", "per-gpu"],
                   help="per-gpu: one seed per visible GPU at a time (default when there are several)")
    p.add_argument("--batch-per-gpu", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides, as for train")
    p.set_defaults(func=_cmd_sweep)

    return parser


def _quiet_numba_finalizer() -> None:
    """Drop numba's harmless KeyError from a collected FFCV Loader's dispatcher; print anything else."""
    default = sys.unraisablehook

    def hook(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (isinstance(unraisable.exc_value, KeyError) and tb is not None
                and "numba" in tb.tb_frame.f_code.co_filename and tb.tb_frame.f_code.co_name == "finalizer"):
            return
        default(unraisable)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_numba_finalizer()
    parser = build_parser(with_benchmarks=argv[:1] == ["bench"])
    args = parser.parse_args(argv)
    from .errors import FastRSBError

    try:
        return int(args.func(args) or 0)
    except FastRSBError as e:
        print(f"fastrsb {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastrsb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
