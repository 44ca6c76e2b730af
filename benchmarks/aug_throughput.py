"""Augmentation throughput against timm's and torchvision's RandAugment; see fastrsb/bench/aug.py.

    python benchmarks/aug_throughput.py [--device cpu|cuda] [--batch 256] [--res 160] [--quick] [--out FILE]
"""
from fastrsb.bench import script_main

if __name__ == "__main__":
    script_main("aug")
