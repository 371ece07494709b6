"""Chunked on-disk canvas that blends overlapping tile logits into one slide-sized label map.

Why on disk and chunked: a 5-class float32 map of a 100k x 80k slide at 0.5 µm/px is ~40 GB
(PEERS.md §7), so the accumulators live in one small ``np.memmap`` file per ``chunk x chunk`` block,
created only when a tile touches it (glass never costs disk). At most ``max_open_mb`` of chunk maps
are mapped at a time (LRU): unmapping a chunk drops its pages from the process, so resident memory is
bounded by the tiles in flight plus that cache, whatever the slide size and whatever the tile order.

Blending: each tile's logits are multiplied by a window and accumulated with the window itself, and
the read-back is ``argmax(sum w*logits / sum w)`` = ``argmax(sum w*logits)`` (the weight is positive).
``blend="gaussian"`` (MONAI/LazySlide) down-weights tile borders, where a CNN's context is worst;
``blend="average"`` (TIAToolbox/CLAM) uses uniform weights. Pixels no tile covered have weight 0 and
read back as 0 = background / not tissue; covered pixels read back as the argmax channel, channel k
being class k (the model predicts 0..N with 0 = background).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

BLENDS = ("gaussian", "average")
# A canvas folder is named after the process that owns it, so a later run can tell a killed run's
# leftover (owner gone) from a canvas another process is filling right now.
_CANVAS_NAME = re.compile(r"canvas\.(\d+)@(.+)\.[^.]+")


class StitchError(ValueError):
    """Bad canvas configuration or a tile that does not fit the canvas."""


def blend_window(
    h: int, w: int, blend: str = "gaussian", sigma_scale: float = 0.25, floor: float = 1e-3
) -> np.ndarray:
    """``h x w`` float32 weights: separable Gaussian (sigma = sigma_scale * side) or all ones.

    The floor keeps border pixels strictly positive, so "weight > 0" always means "covered".
    """
    if blend == "average":
        return np.ones((h, w), np.float32)
    if blend != "gaussian":
        raise StitchError(f"unknown blend {blend!r}; choose from {BLENDS}")

    def g(n: int) -> np.ndarray:
        c = (n - 1) / 2.0
        s = max(sigma_scale * n, 1e-6)
        return np.exp(-0.5 * ((np.arange(n) - c) / s) ** 2)

    win = np.outer(g(h), g(w))
    return np.maximum(win / win.max(), floor).astype(np.float32)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_OWNER_LOCK = ".owner.lock"  # held (flock) by the canvas's process for the canvas's whole life


def _owner_gone(d: Path) -> bool:
    """Whether no process holds canvas ``d``'s owner lock (the kernel drops it when the owner dies).

    A lock that cannot be taken, or a file system that cannot lock, counts as a live owner: keeping a
    dead canvas costs disk, taking a live one fails a running segmentation.
    """
    try:
        fd = os.open(d / _OWNER_LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def drop_stale_canvases(folder: str | Path) -> list[Path]:
    """Delete the canvases in ``folder`` whose process has ended: a killed ``segment`` (SIGTERM, OOM)
    never reaches :meth:`Canvas.close`, and its chunk files (up to slide size) would stay forever.

    Only folders named by :class:`Canvas` are candidates. Liveness is the canvas's owner lock, not a pid,
    so containers that share a hostname (or a run whose host name changed) neither take a live canvas nor
    keep a dead one; a canvas without the lock (older versions) is judged by its pid on this host.
    """
    host, dropped = socket.gethostname(), []
    for d in Path(folder).glob("canvas.*"):
        m = _CANVAS_NAME.fullmatch(d.name)
        if not m or not d.is_dir():
            continue
        if (d / _OWNER_LOCK).exists():
            stale = _owner_gone(d)
        else:
            stale = m.group(2) == host and not _running(int(m.group(1)))
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            dropped.append(d)
    return dropped


class Canvas:
    """Blends ``[C, h, w]`` tiles into an ``(H, W)`` canvas of ``n_classes`` channels kept on disk.

    ``path_dir`` is a scratch directory (created; a private sub-directory ``canvas.<pid>@<host>.*`` is
    used and removed by :meth:`close`, or by :func:`drop_stale_canvases` once its process is gone). ``dtype`` float32 (default) or float16 accumulators; float16 halves the disk and
    page-cache footprint at ~3 significant digits, enough for an argmax of blended logits.
    """

    def __init__(
        self,
        path_dir: str | Path,
        shape: tuple[int, int],
        n_classes: int,
        *,
        chunk: int = 1024,
        blend: Literal["gaussian", "average"] = "gaussian",
        dtype: str = "float32",
        sigma_scale: float = 0.25,
        max_open_mb: float = 256.0,
        all_tissue: bool = False,
    ) -> None:
        H, W = (int(v) for v in shape)
        # Inputs known to be tissue everywhere (patch images such as GlaS): the argmax runs over the
        # tissue classes only, so a covered pixel is never called background.
        self.first_label = 1 if all_tissue and n_classes > 1 else 0
        if H < 1 or W < 1:
            raise StitchError(f"canvas shape must be positive, got {shape}")
        if n_classes < 1:
            raise StitchError(f"n_classes must be >= 1, got {n_classes}")
        if chunk < 16:
            raise StitchError(f"chunk must be >= 16, got {chunk}")
        if blend not in BLENDS:
            raise StitchError(f"unknown blend {blend!r}; choose from {BLENDS}")
        if np.dtype(dtype) not in (np.dtype("float32"), np.dtype("float16")):
            raise StitchError(f"accumulator dtype must be float32 or float16, got {dtype}")
        self.shape = (H, W)
        self.n_classes = int(n_classes)
        self.chunk = int(chunk)
        self.blend = blend
        self.dtype = np.dtype(dtype)
        self.sigma_scale = float(sigma_scale)
        Path(path_dir).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"canvas.{_owner()}.", dir=path_dir))
        self._lock_fd = os.open(self.dir / _OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        with contextlib.suppress(OSError):  # a file system without locks: the pid rule of the name remains
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.n_chunks = (math.ceil(H / self.chunk), math.ceil(W / self.chunk))
        self._exists = np.zeros(self.n_chunks, dtype=bool)
        self._open: OrderedDict[tuple[int, int], np.memmap] = OrderedDict()
        self._open_bytes = 0
        self.max_open_bytes = int(max_open_mb * 2**20)
        self._windows: dict[tuple[int, int], np.ndarray] = {}
        self.tiles_added = 0
        self._closed = False

    # -- chunk storage ---------------------------------------------------------------------------
    def _chunk_shape(self, cy: int, cx: int) -> tuple[int, int, int]:
        h = min(self.chunk, self.shape[0] - cy * self.chunk)
        w = min(self.chunk, self.shape[1] - cx * self.chunk)
        return (self.n_classes + 1, h, w)  # channels 0..C-1: sum w*logits; channel C: sum w

    def _chunk(self, cy: int, cx: int, create: bool) -> np.memmap | None:
        key = (cy, cx)
        mm = self._open.get(key)
        if mm is not None:
            self._open.move_to_end(key)
            return mm
        if not self._exists[cy, cx] and not create:
            return None
        if self._closed:
            raise StitchError("canvas is closed")
        shape = self._chunk_shape(cy, cx)
        mode = "r+" if self._exists[cy, cx] else "w+"  # w+ creates a zero-filled (sparse) file
        mm = np.memmap(self.dir / f"c{cy}_{cx}.bin", dtype=self.dtype, mode=mode, shape=shape)
        self._exists[cy, cx] = True
        self._open[key] = mm
        self._open_bytes += mm.nbytes
        # Evict least recently used maps; dirty pages stay in the page cache and reach the file.
        while self._open_bytes > self.max_open_bytes and len(self._open) > 1:
            _, old = self._open.popitem(last=False)
            self._open_bytes -= old.nbytes
            del old
        return mm

    def _window(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = blend_window(h, w, self.blend, self.sigma_scale)
        return win

    # -- writing ---------------------------------------------------------------------------------
    def add(self, y: int, x: int, logits: np.ndarray, weight: np.ndarray | None = None) -> None:
        """Blend ``logits [C, h, w]`` whose top-left is canvas pixel (y, x); parts outside are clipped.

        ``weight`` (h x w, > 0) overrides the blend window, e.g. to zero pixels a tile should not vote on.
        """
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[0] != self.n_classes:
            raise StitchError(f"tile logits must be [{self.n_classes}, h, w], got shape {logits.shape}")
        _, h, w = logits.shape
        win = self._window(h, w) if weight is None else np.asarray(weight, np.float32)
        if win.shape != (h, w):
            raise StitchError(f"weight shape {win.shape} does not match tile {h}x{w}")
        y, x = int(y), int(x)
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, self.shape[0]), min(x + w, self.shape[1])
        if y0 >= y1 or x0 >= x1:
            return
        c = self.chunk
        for cy in range(y0 // c, (y1 - 1) // c + 1):
            for cx in range(x0 // c, (x1 - 1) // c + 1):
                # Intersection of the tile with this chunk, in canvas coordinates.
                ry0, ry1 = max(y0, cy * c), min(y1, (cy + 1) * c)
                rx0, rx1 = max(x0, cx * c), min(x1, (cx + 1) * c)
                wt = win[ry0 - y : ry1 - y, rx0 - x : rx1 - x]
                lg = logits[:, ry0 - y : ry1 - y, rx0 - x : rx1 - x]
                mm = self._chunk(cy, cx, create=True)
                sl = (slice(ry0 - cy * c, ry1 - cy * c), slice(rx0 - cx * c, rx1 - cx * c))
                acc = mm[(slice(0, self.n_classes), *sl)]
                acc += (lg.astype(np.float32) * wt).astype(self.dtype, copy=False)
                mm[(self.n_classes, *sl)] += wt.astype(self.dtype, copy=False)
        self.tiles_added += 1

    # -- reading ---------------------------------------------------------------------------------
    def _check_region(self, y: int, x: int, h: int, w: int) -> None:
        if h < 1 or w < 1:
            raise StitchError(f"region size must be positive, got {h}x{w}")
        if y < 0 or x < 0 or y + h > self.shape[0] or x + w > self.shape[1]:
            raise StitchError(f"region y={y} x={x} {h}x{w} leaves the canvas {self.shape}")

    def _chunk_parts(self, y: int, x: int, h: int, w: int):
        """Existing chunks under a region: (memmap, region-relative slices, chunk-relative slices).

        The region is checked here, eagerly, before the caller allocates anything of its size.
        """
        self._check_region(y, x, h, w)
        return self._iter_chunk_parts(y, x, h, w)

    def _iter_chunk_parts(self, y: int, x: int, h: int, w: int):
        c = self.chunk
        for cy in range(y // c, (y + h - 1) // c + 1):
            for cx in range(x // c, (x + w - 1) // c + 1):
                mm = self._chunk(cy, cx, create=False)
                if mm is None:
                    continue
                ry0, ry1 = max(y, cy * c), min(y + h, (cy + 1) * c)
                rx0, rx1 = max(x, cx * c), min(x + w, (cx + 1) * c)
                out = (slice(ry0 - y, ry1 - y), slice(rx0 - x, rx1 - x))
                yield mm, out, (slice(ry0 - cy * c, ry1 - cy * c), slice(rx0 - cx * c, rx1 - cx * c))

    def _read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(sum w*logits [C,h,w] float32, sum w [h,w] float32) of a region; zeros where nothing landed."""
        parts = self._chunk_parts(y, x, h, w)
        acc = np.zeros((self.n_classes, h, w), np.float32)
        wsum = np.zeros((h, w), np.float32)
        for mm, out, sl in parts:
            acc[(slice(None), *out)] = mm[(slice(0, self.n_classes), *sl)]
            wsum[out] = mm[(self.n_classes, *sl)]
        return acc, wsum

    def argmax_tile(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 ``h x w`` labels: argmax channel where covered (weight > 0), 0 where no tile landed."""
        parts = self._chunk_parts(y, x, h, w)
        labels = np.zeros((h, w), np.uint8)
        # Chunk by chunk: temporaries stay O(C x h x chunk) even for a band across a 100k-px-wide slide.
        for mm, out, sl in parts:
            logits = np.asarray(mm[(slice(self.first_label, self.n_classes), *sl)])
            lab = (logits.argmax(axis=0) + self.first_label).astype(np.uint8)
            lab[np.asarray(mm[(self.n_classes, *sl)]) <= 0] = 0
            labels[out] = lab
        return labels

    def mean_tile(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(blended logits [C,h,w] float32, coverage weight [h,w]); logits are 0 where uncovered."""
        acc, wsum = self._read(y, x, h, w)
        covered = wsum > 0
        acc[:, covered] /= wsum[covered]
        return acc, wsum

    def iter_bands(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(y, uint8 labels ``rows x W``) bands top to bottom; one band in RAM at a time."""
        rows = rows or self.chunk
        for y in range(0, self.shape[0], rows):
            h = min(rows, self.shape[0] - y)
            yield y, self.argmax_tile(y, 0, h, self.shape[1])

    @property
    def chunks_on_disk(self) -> int:
        return int(self._exists.sum())

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and delete every chunk file (idempotent)."""
        self._open.clear()
        self._open_bytes = 0
        if not self._closed:
            self._closed = True
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # after the removal: no sweep can see an unlocked live canvas

    def __enter__(self) -> Canvas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
