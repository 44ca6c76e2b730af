"""Loader throughput per backend against timm's own A3 loader; see fastrsb/bench/loader.py.

    python benchmarks/loader_throughput.py --demo --quick            # anywhere, no GPU needed
    python benchmarks/loader_throughput.py --data OUT --src SRC --device cuda --workers 16 [--out FILE]
"""
import sys

from fastrsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "loader", *sys.argv[1:]]))
