"""Atomic file writes (temp name in the same folder, fsync, rename) and JSON-safe conversion.

Every output of the engine goes through here, so a crash never leaves a half-written file under its
final name and a re-run sees either the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_save(path: str | Path, save: Callable[[str], Any]) -> Path:
    """Call ``save(tmp_path)`` then rename onto ``path``; the temp file never survives an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(x: Any) -> Any:
    """numpy scalars/arrays, tuples and paths -> plain JSON types (recursively)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if (isinstance(x, float) and x != x) or x in (float("inf"), float("-inf")):
        return None  # JSON has no NaN/inf
    if isinstance(x, Path):
        return str(x)
    return x
