"""Step (c1) of segmenting a slide: resample each tile's class maps onto the output grid and blend them
into the on-disk :class:`~pbip_engine.engine.inference.stitch.Canvas`.

Tiles come at the model's resolution and may arrive in any order, singly or in batches; the output grid
has its own pitch (``output_mpp``), so every tile is resampled to the output pixels whose centres it
covers before it is blended.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.inference.plan import SegmentError
from pbip_engine.engine.inference.stitch import Canvas


def _resample_taps(
    n_out: int, out_start: float, out_step: float, n_src: int, src_start: float, src_step: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse linear-interpolation weights (antialiased when shrinking) between two 1-D pixel grids.

    Grid pixel k covers [start + k step, start + (k+1) step) in level-0 units. Each output pixel samples
    the source at its centre with a triangle kernel max(1, out_step/src_step) source pixels wide,
    clamped at the source border (edge replication). Returns (index, weight), both ``n_out x taps``,
    weights summing to 1 per row. Sparse taps instead of a dense matrix product: small GEMMs go through
    a multi-threaded BLAS that crawls on a busy machine.
    """
    centres = (out_start + (np.arange(n_out) + 0.5) * out_step - src_start) / src_step - 0.5
    centres = np.clip(centres, 0.0, n_src - 1.0)
    k = max(1.0, out_step / src_step)
    first = np.floor(centres - k).astype(np.int64) + 1
    offsets = np.arange(int(np.ceil(2 * k)) + 1)
    idx = first[:, None] + offsets[None, :]
    wts = np.maximum(0.0, 1.0 - np.abs(idx - centres[:, None]) / k)
    wts[(idx < 0) | (idx >= n_src)] = 0.0
    wts /= wts.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_src - 1), wts.astype(np.float32)


def tile_to_output(x: int, y: int, size0: int, maps: np.ndarray, r: float) -> tuple[int, int, np.ndarray]:
    """Resample tile maps ``[C, h, w]`` covering level-0 [x, x+size0) onto the output grid of pitch ``r``.

    Returns (row, col, [C, ho, wo]) for the output pixels whose centres fall inside the tile. When the
    tile grid coincides with the output grid (same pitch, aligned), the maps are returned unchanged.
    """
    c, h, w = maps.shape
    sy, sx = size0 / h, size0 / w
    j0 = math.ceil(x / r - 0.5)
    j1 = math.ceil((x + size0) / r - 0.5)
    i0 = math.ceil(y / r - 0.5)
    i1 = math.ceil((y + size0) / r - 0.5)
    ho, wo = i1 - i0, j1 - j0
    if ho <= 0 or wo <= 0:
        return i0, j0, np.zeros((c, 0, 0), np.float32)
    aligned = (
        ho == h
        and wo == w
        and abs(sy - r) < 1e-9
        and abs(sx - r) < 1e-9
        and abs(x - j0 * r) < 1e-6
        and abs(y - i0 * r) < 1e-6
    )
    if aligned:
        return i0, j0, maps
    src = maps.astype(np.float32, copy=False)
    f = int(min(r / sx, r / sy) + 1e-9)
    if f >= 2 and h % f == 0 and w % f == 0:  # integer shrink first: exact f x f box average
        src = src.reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))
        h, w, sy, sx = h // f, w // f, sy * f, sx * f
    if max(r / sx, r / sy) <= 1.5:
        # Near 1:1 or upsampling: bilinear sampling at the output pixel centres (OpenCV, per channel).
        m = np.array(
            [[r / sx, 0.0, ((j0 + 0.5) * r - x) / sx - 0.5], [0.0, r / sy, ((i0 + 0.5) * r - y) / sy - 0.5]],
            np.float64,
        )
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        out = np.stack(
            [
                cv2.warpAffine(src[k], m, (wo, ho), flags=flags, borderMode=cv2.BORDER_REPLICATE)
                for k in range(c)
            ]
        )
        return i0, j0, out
    iy, wy = _resample_taps(ho, i0 * r, r, h, y, sy)
    ix, wx = _resample_taps(wo, j0 * r, r, w, x, sx)
    tmp = np.einsum("chwt,wt->chw", src[:, :, ix], wx)  # columns: [C, h, wo]
    out = np.einsum("chwt,ht->chw", tmp[:, iy].transpose(0, 1, 3, 2), wy)  # rows: [C, ho, wo]
    return i0, j0, np.ascontiguousarray(out)


def _iter_tile_results(
    tile_results: Iterable[Mapping[str, Any]], key: str | None
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(x, y, size0, maps [C,h,w]) from single tiles or batches (``maps`` B,C,h,w), logits or probs."""
    for item in tile_results:
        k = key or ("logits" if "logits" in item else "probs" if "probs" in item else None)
        if k is None or k not in item:
            raise SegmentError(f"tile result needs a 'logits' or 'probs' entry, got keys {sorted(item)}")
        maps = np.asarray(item[k])
        xs, ys, ss = (np.atleast_1d(np.asarray(item[c])) for c in ("x", "y", "size0"))
        if maps.ndim == 3:
            maps = maps[None]
        if maps.ndim != 4 or not (len(maps) == len(xs) == len(ys) == len(ss)):
            raise SegmentError(f"tile result '{k}' has shape {maps.shape} for {len(xs)} tile coordinates")
        for b in range(len(maps)):
            yield int(xs[b]), int(ys[b]), int(ss[b]), maps[b]


@dataclass
class FillStats:
    """How filling went: tiles blended, seconds waiting on the iterable (upstream inference) and stitching."""

    n_tiles: int = 0
    wait_s: float = 0.0
    stitch_s: float = 0.0


def fill_canvas(
    canvas: Canvas,
    tile_results: Iterable[Mapping[str, Any]],
    r: float,
    slide_path: str | Path,
    class_names: Sequence[str],
) -> FillStats:
    """Blend every tile of ``tile_results`` into ``canvas`` (output pitch ``r`` level-0 pixels).

    The iterable is consumed once and may be lazy (a prediction pipeline): time spent waiting on it is
    counted apart, so the statistics say whether inference or stitching is the bottleneck.
    """
    n_labels = len(class_names) + 1
    stats = FillStats()
    it = iter(_iter_tile_results(tile_results, None))
    while True:
        t0 = time.perf_counter()
        try:
            x, y, size0, maps = next(it)
        except StopIteration:
            stats.wait_s += time.perf_counter() - t0
            break
        t1 = time.perf_counter()
        stats.wait_s += t1 - t0
        if maps.shape[0] != n_labels:
            raise SegmentError(
                f"{slide_path}: tile at x={x} y={y} has {maps.shape[0]} channels, expected {n_labels} "
                f"(background + {len(class_names)} classes {list(class_names)})"
            )
        i0, j0, out = tile_to_output(x, y, size0, maps, r)
        if out.size:
            canvas.add(i0, j0, out)
        stats.n_tiles += 1
        stats.stitch_s += time.perf_counter() - t1
    return stats
