"""`fastrsb bench {preflight,convert,scale,loader,aug,step,e2e,parity}`: one question per module, one result format.

Each module has `add_arguments(parser)` and `run(args)`, prints JSON lines of the schema in
`fastrsb/benchlog.py` (and appends them to `--out FILE` when given), and measures its baseline in the
same run. `benchmarks/<name>_throughput.py` run the same benchmarks as scripts.
"""
import importlib

BENCHMARKS = ("preflight", "convert", "scale", "loader", "aug", "step", "e2e", "parity")


def get(name: str):
    if name not in BENCHMARKS:
        from fastrsb.errors import FastRSBError

        raise FastRSBError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"fastrsb.bench.{name}")


def describe(module) -> str:
    """The first line of a benchmark module's docstring: its question."""
    return module.__doc__.strip().splitlines()[0]
