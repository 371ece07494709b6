"""Tiny synthetic slides for the reader/tissue/tiling tests (written with tifffile, no real data needed)."""

from __future__ import annotations

import struct
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


def sparse_tiff(path: Path, w: int, h: int, mpp: float, tile: int = 4096) -> Path:
    """A valid tiled RGB TIFF declaring w x h pixels whose tiles are all absent (byte count 0): a few
    hundred bytes that readers take for a w x h image."""
    n = -(-w // tile) * -(-h // tile)
    entries = 14
    ifd_at = 8
    data_at = ifd_at + 2 + entries * 12 + 4
    bps_at, xres_at = data_at, data_at + 6
    yres_at, offs_at = xres_at + 8, xres_at + 16
    counts_at = offs_at + 4 * n
    res = (round(1e4 / mpp * 1000), 1000)
    tags = [
        (256, 4, 1, w),
        (257, 4, 1, h),
        (258, 3, 3, bps_at),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (282, 5, 1, xres_at),
        (283, 5, 1, yres_at),
        (284, 3, 1, 1),
        (296, 3, 1, 3),
        (322, 4, 1, tile),
        (323, 4, 1, tile),
        (324, 4, n, offs_at),
        (325, 4, n, counts_at),
    ]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", entries))
    for tag, typ, count, value in tags:
        packed = (
            struct.pack("<H", value) + b"\x00\x00" if typ == 3 and count == 1 else struct.pack("<I", value)
        )
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0)
    out += struct.pack("<3H", 8, 8, 8) + struct.pack("<2I", *res) + struct.pack("<2I", *res)
    out += struct.pack(f"<{n}I", *([counts_at + 4 * n] * n)) + struct.pack(f"<{n}I", *([0] * n))
    path.write_bytes(bytes(out))
    return path
