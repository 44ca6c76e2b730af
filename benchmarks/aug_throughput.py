"""Train augmentation throughput (RandAugment + mixup/cutmix + normalise) against timm's; see fastrsb/bench/aug.py.

    python benchmarks/aug_throughput.py [--device cpu|cuda] [--batches 256,2048] [--res 160] [--quick] [--out FILE]
"""
import sys

from fastrsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "aug", *sys.argv[1:]]))
