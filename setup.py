"""fastrsb: ResNet Strikes Back recipes, trained fast on one node.

`loaders/` ships inside the package as `fastrsb.loaders` (no top-level `loaders` module is installed); a
plain checkout imports it under the same name (fastrsb/__init__.py).
"""
from setuptools import setup

setup(
    name="fastrsb",
    version="0.1.0",
    description="ResNet Strikes Back (A1/A2/A3) ImageNet training, fast on one node: FFCV/DALI loaders, "
    "GPU augmentation, multi-tensor LAMB",
    packages=["fastrsb", "fastrsb.augment", "fastrsb.bench", "fastrsb.loaders"],
    package_dir={"fastrsb": "fastrsb", "fastrsb.loaders": "loaders"},
    python_requires=">=3.10",
    # opencv-python: the converter encodes JPEGs exactly as FFCV does (ffcv itself requires it too)
    install_requires=["torch>=2.1", "torchvision", "timm>=1.0", "numpy", "pillow", "tqdm", "opencv-python", "numba"],
    extras_require={
        # FFCV compiles against libturbojpeg and OpenCV: setup.sh installs the Debian packages first.
        "ffcv": ["ffcv>=1.0.2"],
        "dali": ["nvidia-dali-cuda120"],
        # Half the size of the cuda120 build and matches torch's CUDA 13 wheels.
        "dali-cuda130": ["nvidia-dali-cuda130"],
        # TensorBoard event files of `fastrsb train` (torch.utils.tensorboard writes them)
        "tensorboard": ["tensorboard"],
        # ImageNet as downloaded (loaders/imagenet.py): Hugging Face's parquet shards, the devkit's meta.mat
        "imagenet": ["pyarrow", "scipy"],
        # `fastrsb digits-data`: the UCI digits bundled with scikit-learn (the evidence in benchmarks/results/)
        "evidence": ["scikit-learn"],
        "dev": ["pytest", "pytest-timeout", "matplotlib", "tensorboard", "pyarrow", "scipy", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fastrsb=fastrsb.cli:main"]},
)
