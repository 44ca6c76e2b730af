"""Augmentation throughput against timm's and torchvision's RandAugment; see fastrsb/bench/aug.py.

    python benchmarks/aug_throughput.py [--device cpu|cuda] [--batch 256] [--res 160] [--quick] [--out FILE]
"""
import sys

from fastrsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "aug", *sys.argv[1:]]))
