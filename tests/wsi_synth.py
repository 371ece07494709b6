"""Tiny synthetic slides for the reader/tissue/tiling tests (written with tifffile, no real data needed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile


def he_like(h: int, w: int, blobs: list[tuple[int, int, int]], seed: int = 0) -> np.ndarray:
    """White glass with pink/purple discs (cx, cy, r) of textured "tissue"."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8)
    img += rng.integers(0, 6, size=img.shape, dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for cx, cy, r in blobs:
        cv2.circle(mask, (cx, cy), r, 1, -1)
    tissue = np.stack(
        [
            rng.integers(150, 210, (h, w)),
            rng.integers(60, 120, (h, w)),
            rng.integers(140, 200, (h, w)),
        ],
        axis=2,
    ).astype(np.uint8)
    img[mask > 0] = tissue[mask > 0]
    return img


def write_pyramid(
    path: Path,
    level0: np.ndarray,
    mpp: float | None = 0.5,
    n_levels: int = 3,
    tile: int = 64,
    compression: str = "jpeg",
    resolution_unit: str = "CENTIMETER",
) -> Path:
    """Generic pyramidal RGB TIFF (levels as top-level IFDs, subfiletype=1), as cuCIM/tiffslide read."""
    levels = [level0]
    for _ in range(1, n_levels):
        prev = levels[-1]
        levels.append(
            cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA)
        )
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            kw: dict = {}
            if mpp is not None:
                factor = 1e4 if resolution_unit == "CENTIMETER" else 25400.0
                res = factor / (mpp * 2**i)
                kw = {"resolution": (res, res), "resolutionunit": resolution_unit}
            else:
                kw = {"resolution": (1, 1), "resolutionunit": "NONE"}
            tw.write(
                img,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **kw,
            )
    return path
