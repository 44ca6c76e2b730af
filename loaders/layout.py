"""The on-disk layout `fastrsb convert` writes: the one place that spells out its paths."""
from __future__ import annotations

import json
import os
from pathlib import Path


def classes_path(data) -> Path:
    return Path(data) / "classes.json"


def is_converted(data) -> bool:
    return classes_path(data).is_file()


def read_classes(data) -> list[str]:
    return json.loads(classes_path(data).read_text())


def beton_path(data, split) -> Path:
    return Path(data) / split / f"{split}.beton"


def wds_dir(data, split) -> Path:
    return Path(data) / split / "wds"


def wds_shards(data, split) -> list[Path]:
    return sorted(wds_dir(data, split).glob("*.tar"))


def find_classes(split_dir) -> list[str]:
    """Class folders of a source ImageFolder split, sorted (label = position), hidden folders skipped."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
