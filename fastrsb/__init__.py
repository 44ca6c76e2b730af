"""fastrsb: ResNet Strikes Back (arXiv 2110.00476) ImageNet training, fast on one node.

`fastrsb.loaders` is the top-level `loaders/` folder of the repository. An install (`pip install .`,
`setup.py`'s package_dir) places it inside the package; in a plain checkout (or an editable install,
or PYTHONPATH pointing at a checkout) the repository root joins this package's search path, so the
same folder imports under the same one name. `import loaders` on its own is refused (loaders/__init__.py).
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

_here = _Path(__file__).resolve().parent
if not (_here / "loaders").is_dir() and (_here.parent / "loaders" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # a checkout: fastrsb.loaders -> <repo>/loaders
del _here, _Path
