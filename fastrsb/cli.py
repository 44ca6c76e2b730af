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


def build_parser() -> argparse.ArgumentParser:
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

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
