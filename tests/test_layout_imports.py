"""The package reads top-down (STYLE.md, issue 11): cli -> commands -> train / convert / bench -> augment,
loaders -> recipes, formats. No module imports one above it, no two modules import each other, and
`loaders/` imports under one name only."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lower layers first; a module may import its own layer or lower ones. Prefixes match module names.
LAYERS = [
    ["fastrsb.errors", "fastrsb.lock", "fastrsb.preempt", "fastrsb.runmeta", "fastrsb.recipes", "fastrsb.schedule",
     "fastrsb.images",
     "fastrsb.loaders.wds", "fastrsb.loaders.sampling", "fastrsb.loaders.layout", "fastrsb.loaders.source",
     "fastrsb.loaders.registry", "fastrsb.loaders.beton", "fastrsb.loaders.resample", "fastrsb.benchlog",
     "fastrsb.runlog"],
    ["fastrsb.loaders", "fastrsb.augment", "fastrsb.loss", "fastrsb.optim"],
    ["fastrsb.runtime", "fastrsb.step", "fastrsb.checkpoint", "fastrsb.evaluate", "fastrsb.prefetch"],
    ["fastrsb.train", "fastrsb.convert", "fastrsb.verify", "fastrsb.bench", "fastrsb.demo_data", "fastrsb.sweep",
     "fastrsb.report", "fastrsb.timm_reference", "fastrsb.digits_data"],
    ["fastrsb.demo", "fastrsb.commands"],
    ["fastrsb.cli", "fastrsb.__main__"],
]


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((REPO / "fastrsb", "fastrsb"), (REPO / "loaders", "fastrsb.loaders")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("fastrsb"):
                out.add(t)
    return out


def _layer(name: str) -> int:
    if name == "fastrsb":  # the package itself: __version__ and the path of fastrsb.loaders
        return 0
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name} has no layer in tests/test_layout_imports.py"
    return rank


def test_imports_read_top_down_without_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if _layer(t) > _layer(m) and not (m == "fastrsb" or t.startswith(m + "."))]
    assert not upward, f"modules importing a higher layer: {upward}"
    mutual = sorted({tuple(sorted((a, b))) for a, ts in graph.items() for b in ts if a in graph.get(b, ())
                     and not (b.startswith(a + ".") or a.startswith(b + "."))})
    assert not mutual, f"modules importing each other: {mutual}"


def test_loaders_import_under_one_name(tmp_path):
    """From a plain checkout (no install), `fastrsb.loaders` is the repo's loaders/; `import loaders` is refused."""
    code = ("import fastrsb.loaders, sys; print(fastrsb.loaders.__file__)\n"
            "try:\n    import loaders\nexcept ImportError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert Path(first) == REPO / "loaders" / "__init__.py"
    assert second.startswith("refused:") and "fastrsb.loaders" in second


@pytest.mark.parametrize("backend", ["ffcv", "dali", "pil"])
def test_backends_register_themselves(backend):
    from fastrsb.loaders import registry

    assert backend in registry.names()
    spec = registry.get(backend)
    assert spec.name == backend and callable(spec.open) and callable(spec.has_data)
