"""Training-step throughput against timm's eager Lamb step; see fastrsb/bench/step.py.

    python benchmarks/step_throughput.py [--quick] [--res 160,224] [--batch 256,2048] [--out FILE]
"""
import sys

from fastrsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "step", *sys.argv[1:]]))
