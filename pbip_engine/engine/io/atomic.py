"""Atomic file writes (temp name in the same folder, fsync, rename) and JSON-safe conversion.

Every output of the engine goes through here, so a crash never leaves a half-written file under its
final name and a re-run sees either the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | Path, *, keep_suffix: bool = False, sync_dir: bool = False) -> Iterator[Path]:
    """Yield a fresh temp path next to ``path``; on success fsync it and rename it onto ``path``.

    For writers that want a file name rather than bytes (tifffile, pyarrow, safetensors, torch). The temp
    name is hidden (``.<name>.<random>.tmp``) so the driver's clean-up finds what a killed worker left;
    ``keep_suffix`` appends the final suffix for writers that pick a format by it. ``sync_dir`` also
    fsyncs the folder, so that the rename itself survives a power cut (large outputs users wait for).
    On any error the temp file is removed and the old ``path``, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass  # some file systems cannot fsync a folder; the file itself is already durable


def atomic_save(path: str | Path, save: Callable[[str], Any]) -> Path:
    """Call ``save(tmp_path)`` then rename onto ``path``; the temp file never survives an error."""
    with atomic_path(path) as tmp:
        save(str(tmp))
    return Path(path)


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
