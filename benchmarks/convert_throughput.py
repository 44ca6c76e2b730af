"""Conversion throughput per worker count against ffcv-imagenet's writer recipe; see fastrsb/bench/convert.py.

    python benchmarks/convert_throughput.py [--images 2000] [--workers 1,2] [--out FILE]
"""
import sys

from fastrsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "convert", *sys.argv[1:]]))
