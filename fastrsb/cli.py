"""The `fastrsb` command line (also `python -m fastrsb`): the parser and the error handling.

The subcommands, each with its options beside the code that runs it, are in fastrsb/commands.py.
A user error (`FastRSBError`) prints one line and exits with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser(with_benchmarks: bool = True) -> argparse.ArgumentParser:
    """with_benchmarks=False leaves out the benchmarks' own options, whose modules import torch."""
    from .commands import COMMANDS, _bench_args

    parser = argparse.ArgumentParser(prog="fastrsb", description="ResNet Strikes Back recipes, trained fast on one node.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run, _ in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if add_arguments is _bench_args:
            _bench_args(p, with_benchmarks)
        else:
            add_arguments(p)
        p.set_defaults(func=run)
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


def _passive_openmp_threads() -> None:
    """OpenMP threads that sleep when they wait, unless the user chose otherwise (before torch loads it).

    By default libgomp's threads spin at the end of every parallel region until their team's slowest
    thread arrives. A run always shares the cores with its loader's workers, and a spinning team then
    waits for a descheduled thread at every op."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _keep_freed_memory() -> bool:
    """glibc: large blocks come from the heap and stay there when freed, for the next batch to reuse.

    By default glibc maps every allocation over 32 MiB afresh and unmaps it when freed, so each batch-sized
    tensor (a batch of 512 uint8 images at 160 px is 39 MB; normalised to float32, 157 MB) pays a page fault
    per 4 KiB on first touch, several times per step. The process keeps its peak memory instead, as it
    would with jemalloc or tcmalloc. Returns whether glibc took the setting."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt parameters to set
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))


def main(argv: list[str] | None = None) -> int:
    _passive_openmp_threads()
    _keep_freed_memory()
    from .commands import check_overrides
    from .errors import FastRSBError

    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_numba_finalizer()
    parser = build_parser(with_benchmarks=argv[:1] == ["bench"])
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse printed the usage and the error (or --help)
        return int(e.code or 0)
    try:
        args.overrides = check_overrides(args.command, extra)
        return int(args.func(args) or 0)
    except FastRSBError as e:
        from .preempt import Preempted, PREEMPTED_EXIT

        if isinstance(e, Preempted):
            print(f"fastrsb {args.command}: {e}", file=sys.stderr)
            return PREEMPTED_EXIT
        print(f"fastrsb {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastrsb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
