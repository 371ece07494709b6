"""Atomic file writes (temp name in the same folder, fsync, rename) and JSON-safe conversion.

Every output of the engine goes through here, so a crash never leaves a half-written file under its
final name and a re-run sees either the old file or the new one.

Temp files live in a dedicated ``.pbip-tmp/`` folder beside their final name (same file system, so the
rename stays atomic): a clean-up can then remove what an interrupted write left without guessing from
file names, which a user's file (a slide called ``.tmp-scan.svs``) could also match. Finished files get
the permissions of a normal ``open()`` write (0666 minus the umask), not ``mkstemp``'s private 0600, so
other users of shared storage can read them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

TEMP_DIR = ".pbip-tmp"  # the only place atomic writes put temp files (see the module docstring)

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (briefly visible to other threads)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temp_dirs(root: str | Path) -> list[Path]:
    """Every atomic-write temp folder under ``root`` (what interrupted writes can have left)."""
    return sorted(p for p in Path(root).rglob(TEMP_DIR) if p.is_dir())


def _mkstemp(folder: Path, prefix: str, suffix: str) -> Path:
    tmp_dir = folder / TEMP_DIR
    for attempt in range(3):
        tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=tmp_dir)
        except FileNotFoundError:  # another writer removed the emptied folder in between
            if attempt == 2:
                raise
            continue
        os.close(fd)
        return Path(name)
    raise AssertionError("unreachable")


def _drop_empty(tmp_dir: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another write in flight) or already gone
        tmp_dir.rmdir()


@contextmanager
def atomic_path(path: str | Path, *, keep_suffix: bool = False, sync_dir: bool = False) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path``; on success fsync it and rename it onto ``path``.

    For writers that want a file name rather than bytes (tifffile, pyarrow, safetensors, torch). The temp
    file is ``<folder>/.pbip-tmp/.<name>.<random>.tmp`` so the driver's clean-up finds what a killed worker
    left (and readers that glob the folder never see it); ``keep_suffix`` appends the final suffix for
    writers that pick a format by it. ``sync_dir`` also
    fsyncs the folder, so that the rename itself survives a power cut (large outputs users wait for).
    On any error the temp file is removed and the old ``path``, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    tmp = _mkstemp(path.parent, f".{path.name}.", suffix)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared files
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _drop_empty(tmp.parent)
        raise
    _drop_empty(tmp.parent)
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
