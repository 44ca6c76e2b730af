"""Conversion throughput per worker count against ffcv-imagenet's writer recipe; see fastrsb/bench/convert.py.

    python benchmarks/convert_throughput.py [--images 2000] [--workers 1,2] [--out FILE]
"""
from fastrsb.bench import script_main

if __name__ == "__main__":
    script_main("convert")
