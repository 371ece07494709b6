"""mpp-first tile grid: tiles are defined in µm, read from the best pyramid level, resized to ``tile_px``.

Why mpp-first: "level 0" or "20x" mean different physical sizes on different scanners (TRIDENT's
magnification bins, CLAM's ``patch_level``). Here a tile is ``tile_px`` pixels at ``mpp`` µm/px on every
slide. It is read from the coarsest level that is still at least as fine as the target (no upsampling
unless the slide has nothing finer, which is warned about) and resized with INTER_AREA.

Grid: positions ``x_i = round(i * stride0)`` in level-0 pixels with ``stride0 = extent0 * (1 - overlap)``
and ``extent0 = tile_px * mpp / slide_mpp``. Tiles that would leave the slide are dropped (no padding:
padded tiles carry fake white borders into embeddings and pseudo masks). Tissue fractions are exact area
fractions of the tile square covered by the tissue mask (bilinear lookup in the mask's integral image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from pbip_engine.engine.wsi.grid import grid_positions
from pbip_engine.engine.wsi.slides import Slide, SlideError
from pbip_engine.engine.wsi.tissue import TissueResult

log = logging.getLogger(__name__)

# Widest region (pixels at the read level) fetched in one read when several tiles of a row are batched.
DEFAULT_MAX_RUN_PX = 4096
# Tile rows read together by the tile stage: a 224-px row cuts 256-px source tiles ~1.9 times on average,
# a 4-row block ~1.1 times; on the synthetic slides, reading cost per tile drops by ~30 %.
DEFAULT_BLOCK_ROWS = 4


@dataclass
class TileGridParams:
    mpp: float = 0.5  # µm/px of the stored tiles
    tile_px: int = 224  # stored tile edge
    overlap: float = 0.0  # fraction of the tile edge shared with the next tile, in [0, 1)
    min_tissue: float = 0.5  # keep tiles with tissue fraction ≥ this (and > 0)

    def __post_init__(self) -> None:
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise ValueError(f"TileGridParams.mpp must be > 0, got {self.mpp}")
        if self.tile_px < 1:
            raise ValueError(f"TileGridParams.tile_px must be ≥ 1, got {self.tile_px}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"TileGridParams.overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"TileGridParams.min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass
class TileSpec:
    x: int  # level-0 top-left
    y: int
    size0: int  # tile extent in level-0 pixels
    level: int  # pyramid level read from
    read_size: int  # pixels read at that level (then resized to tile_px)
    tissue_fraction: float


def read_level_for(slide: Slide, mpp: float, *, warn: bool = True) -> tuple[int, float]:
    """(level, target downsample) for tiles at ``mpp``; warns when the slide forces upsampling."""
    if slide.mpp is None:
        raise SlideError(slide.path, "no_mpp", "tiling needs the slide's µm/px")
    ds = mpp / slide.mpp
    if warn and ds < 1.0 - 1e-3:
        log.warning(
            "%s: tiles at %.3f µm/px are finer than the slide's level 0 (%.3f µm/px): upsampling %.2fx",
            slide.path,
            mpp,
            slide.mpp,
            1.0 / ds,
        )
    return slide.best_level_for_downsample(ds), ds


def plan_tiles(slide: Slide, tissue: TissueResult, params: TileGridParams) -> list[TileSpec]:
    """Row-major grid of tiles inside the slide whose tissue fraction is ≥ ``params.min_tissue``."""
    level, ds = read_level_for(slide, params.mpp)
    extent0 = params.tile_px * ds
    size0 = max(1, round(extent0))
    read_size = max(1, round(size0 / slide.level_downsamples[level]))
    stride0 = extent0 * (1.0 - params.overlap)
    w0, h0 = slide.dimensions
    xs = grid_positions(w0, size0, stride0, edge="skip")
    ys = grid_positions(h0, size0, stride0, edge="skip")
    if xs.size == 0 or ys.size == 0:
        return []
    frac = tissue_fractions(tissue.mask, tissue.downsample, xs, ys, size0)
    keep = (frac >= params.min_tissue) & (frac > 0)
    iy, ix = np.nonzero(keep)
    return [
        TileSpec(int(xs[i]), int(ys[j]), size0, level, read_size, float(frac[j, i]))
        for j, i in zip(iy.tolist(), ix.tolist(), strict=True)
    ]


def tissue_fractions(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, size0: int
) -> np.ndarray:
    """Fraction of each tile square (xs[i], ys[j], size0) covered by ``mask``; shape (len(ys), len(xs)).

    The mask is piecewise constant, so its continuous integral is bilinear inside each pixel: a bilinear
    lookup in the summed-area table gives the exact covered area for fractional tile edges.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    x0 = np.clip(np.asarray(xs, np.float64) / downsample, 0, w)
    x1 = np.clip((np.asarray(xs, np.float64) + size0) / downsample, 0, w)
    y0 = np.clip(np.asarray(ys, np.float64) / downsample, 0, h)
    y1 = np.clip((np.asarray(ys, np.float64) + size0) / downsample, 0, h)

    def integral(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        # F(y, x) for every pair (yy[j], xx[i]) by bilinear interpolation of the SAT.
        yi = np.minimum(np.floor(yy).astype(np.int64), h - 1)
        xi = np.minimum(np.floor(xx).astype(np.int64), w - 1)
        ty = (yy - yi)[:, None]
        tx = (xx - xi)[None, :]
        a = sat[yi[:, None], xi[None, :]]
        b = sat[yi[:, None], xi[None, :] + 1]
        c = sat[yi[:, None] + 1, xi[None, :]]
        d = sat[yi[:, None] + 1, xi[None, :] + 1]
        return a * (1 - ty) * (1 - tx) + b * (1 - ty) * tx + c * ty * (1 - tx) + d * ty * tx

    area = integral(y1, x1) - integral(y0, x1) - integral(y1, x0) + integral(y0, x0)
    tile_area = (size0 / downsample) ** 2
    return np.clip(area / tile_area, 0.0, 1.0)


def _resize(region: np.ndarray, tile_px: int) -> np.ndarray:
    if region.shape[0] == tile_px and region.shape[1] == tile_px:
        return region
    interp = cv2.INTER_AREA if region.shape[0] >= tile_px else cv2.INTER_LINEAR
    return cv2.resize(region, (tile_px, tile_px), interpolation=interp)


def read_tile(slide: Slide, t: TileSpec, tile_px: int) -> np.ndarray:
    """One tile as RGB uint8 (tile_px, tile_px, 3), read at ``t.level`` and resized."""
    region = slide.read_region((t.x, t.y), t.level, (t.read_size, t.read_size))
    return _resize(region, tile_px)


def iter_tile_runs(
    tiles: Iterable[TileSpec], level_downsample: float, max_run_px: int = DEFAULT_MAX_RUN_PX
) -> Iterator[list[TileSpec]]:
    """Group tiles into runs on one row whose union is one read of ≤ ``max_run_px`` level pixels."""
    for row in _rows(tiles):
        run = [row[0]]
        for t in row[1:]:
            width = math.ceil((t.x + t.size0 - run[0].x) / level_downsample)
            if run[-1].x < t.x <= run[-1].x + run[-1].size0 and width <= max_run_px:
                run.append(t)
                continue
            yield run
            run = [t]
        yield run


def iter_tile_blocks(
    tiles: Iterable[TileSpec],
    level_downsample: float,
    max_run_px: int = DEFAULT_MAX_RUN_PX,
    max_rows: int = DEFAULT_BLOCK_ROWS,
    min_fill: float = 0.5,
) -> Iterator[list[TileSpec]]:
    """Group tiles into rectangles of ≤ ``max_rows`` adjacent rows and ≤ ``max_run_px`` level pixels.

    One read per rectangle decodes each source tile about once, where a row run cuts the source tiles of
    the rows above and below too. The read covers the rectangle's bounding box, so its empty cells
    are decoded for nothing: a rectangle less than ``min_fill`` full is read as row runs instead.
    Order: bands of rows top to bottom, rectangles left to right, row-major inside each. ``max_rows=1``
    gives :func:`iter_tile_runs` (plan order).
    """
    if max_rows <= 1 or max_run_px <= 0:
        yield from iter_tile_runs(tiles, level_downsample, max_run_px)
        return
    for band in _bands(tiles, max_rows):
        yield from _band_blocks(band, level_downsample, max_run_px, min_fill)


def _rows(tiles: Iterable[TileSpec]) -> Iterator[list[TileSpec]]:
    """Consecutive tiles on one row (same y, level and size)."""
    row: list[TileSpec] = []
    for t in tiles:
        if row and (t.y != row[0].y or t.level != row[0].level or t.size0 != row[0].size0):
            yield row
            row = []
        row.append(t)
    if row:
        yield row


def _bands(tiles: Iterable[TileSpec], max_rows: int) -> Iterator[list[list[TileSpec]]]:
    """Runs of ≤ ``max_rows`` rows, each starting at most one tile below the previous one."""
    band: list[list[TileSpec]] = []
    for row in _rows(tiles):
        if band:
            prev, t = band[-1][0], row[0]
            adjacent = prev.y < t.y <= prev.y + prev.size0 and (t.level, t.size0) == (prev.level, prev.size0)
            if not adjacent or len(band) == max_rows:
                yield band
                band = []
        band.append(row)
    if band:
        yield band


def _band_blocks(
    band: list[list[TileSpec]], lds: float, max_run_px: int, min_fill: float
) -> Iterator[list[TileSpec]]:
    size0 = band[0][0].size0
    segment_of: dict[int, int] = {}
    widths: list[int] = []  # distinct columns per segment
    start = prev = None
    for x in sorted({t.x for row in band for t in row}):
        if start is None or x > prev + size0 or math.ceil((x + size0 - start) / lds) > max_run_px:
            start = x
            widths.append(0)
        segment_of[x] = len(widths) - 1
        widths[-1] += 1
        prev = x
    blocks: list[list[TileSpec]] = [[] for _ in widths]
    for row in band:
        for t in row:
            blocks[segment_of[t.x]].append(t)
    for block, n_cols in zip(blocks, widths, strict=True):
        if len(band) == 1 or len(block) >= min_fill * n_cols * len(band):
            yield block
        else:
            yield from iter_tile_runs(block, lds, max_run_px)


def iter_tiles(
    slide: Slide,
    tiles: list[TileSpec],
    tile_px: int,
    max_run_px: int = DEFAULT_MAX_RUN_PX,
    max_rows: int = 1,
) -> Iterator[tuple[TileSpec, np.ndarray]]:
    """(tile, RGB pixels) for every tile, reading neighbours in one region (:func:`iter_tile_blocks`).

    One wide read replaces many small ones: fewer calls, each source tile decoded once even when
    neighbours share it. ``max_run_px=0`` reads tile by tile. ``max_rows=1`` (row runs) keeps the plan's
    order, which positional consumers need; more rows change it to block order. Pixels equal
    :func:`read_tile`'s at level 0 and agree to ≤ 1 level pixel of offset on coarser levels (rounding).
    """
    for block in iter_tile_blocks(tiles, _level_ds(slide, tiles), max_run_px, max_rows):
        if len(block) == 1:
            yield block[0], read_tile(slide, block[0], tile_px)
            continue
        first = block[0]
        lds = slide.level_downsamples[first.level]
        x0, y0 = min(t.x for t in block), min(t.y for t in block)
        # Offsets of each tile inside the region at the read level, from the same floor() the backends use.
        bx, by = math.floor(x0 / lds), math.floor(y0 / lds)
        offsets = [(math.floor(t.x / lds) - bx, math.floor(t.y / lds) - by) for t in block]
        width = max(ox for ox, _ in offsets) + first.read_size
        height = max(oy for _, oy in offsets) + first.read_size
        region = slide.read_region((x0, y0), first.level, (width, height))
        for t, (ox, oy) in zip(block, offsets, strict=True):
            yield t, _resize(region[oy : oy + t.read_size, ox : ox + t.read_size], tile_px)


def _level_ds(slide: Slide, tiles: list[TileSpec]) -> float:
    return slide.level_downsamples[tiles[0].level] if tiles else 1.0
