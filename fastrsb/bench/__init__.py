"""`fastrsb bench {convert,loader,aug,step,e2e,parity}`: one question per module, one result format.

Each module has `add_arguments(parser)` and `run(args)`, prints JSON lines of the schema in
`fastrsb/benchlog.py` (and appends them to `--out FILE` when given), and measures its baseline in the
same run. `benchmarks/<name>_throughput.py` are the same benchmarks as scripts.
"""
import importlib

BENCHMARKS = ("convert", "loader", "aug", "step", "e2e", "parity")


def get(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"fastrsb.bench.{name}")


def script_main(name: str, argv=None) -> None:
    """Entry point of benchmarks/<name>_throughput.py: the same as `fastrsb bench <name> ARGS`."""
    import sys

    from fastrsb.cli import main

    sys.exit(main(["bench", name, *(sys.argv[1:] if argv is None else argv)]))
