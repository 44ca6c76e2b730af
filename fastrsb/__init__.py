"""fastrsb: ResNet Strikes Back (arXiv 2110.00476) ImageNet training, fast on one node."""

__version__ = "0.1.0"
