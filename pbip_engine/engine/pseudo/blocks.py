"""A slide's labelled tiles in blocks of bounded size, each read and stitched with a ring of context tiles.

The pseudo stage reads and stitches a slide's CAMs on canvases spanning its labelled tiles (``stitch.py``,
``region_cams.py``). With slide-level labels every tissue tile is labelled, so on a whole slide those canvases
cover the whole section: at 0.5 µm/px a 20 x 15 mm section is 40,000 x 30,000 px, and the canvases (RGB, one
CAM per class, the stitching sums, the label counts, the per-tile cut-outs of half-overlapping tiles) took ~120
bytes a pixel with four classes (``bench/bench_pseudo_blocks.py``: 4.7 GB for a 6,144-px slide), ~150 GB for that
section. In blocks of 4,096 px the same slide peaked at 2.3 GB, in blocks of 2,048 px at 0.9 GB, whatever the
slide's size (BENCHMARKS.md, session 28).
Blocks bound that: the tiles are split by their centres into blocks of at most ``block_px`` canvas px a side,
and each block is read and stitched together with the tiles within ``margin_tiles`` tiles around it, then
writes only its own tiles' masks. A tile at a block's edge so still sees its neighbours' tissue and is
stitched with every tile that overlaps it; only what the stage takes per slide (the slide's own prototypes,
the least certain fraction of its pixels) is taken per block.

A slide whose labelled tiles fit in one block (every patch image, the demo's slides) is one block with every
tile kept: its masks are exactly the unblocked ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Block", "slide_blocks"]


@dataclass(frozen=True)
class Block:
    """``members``: indices of the tiles read and stitched together; ``keep`` (bool over ``members``): the
    tiles whose masks this block writes. Every tile is kept by exactly one block."""

    members: np.ndarray
    keep: np.ndarray


def slide_blocks(
    xs: Sequence[int],
    ys: Sequence[int],
    sizes0: Sequence[int],
    tile_px: int,
    block_px: int,
    margin_tiles: float = 2.0,
) -> list[Block]:
    """Blocks of one slide's tiles (level-0 squares ``x, y, size0`` that become ``tile_px``-px images).

    A block is a square of ``block_px`` canvas px (at the tiles' scale) on a grid anchored at the tiles'
    top-left corner; it keeps the tiles whose centres fall in it and reads with them every tile whose square
    reaches within ``margin_tiles`` tile sizes of it. Blocks keep their tiles in index order.
    """
    x = np.asarray(xs, np.float64)
    y = np.asarray(ys, np.float64)
    s = np.asarray(sizes0, np.float64)
    n = len(x)
    if n == 0:
        return []
    if block_px < 1 or tile_px < 1:
        raise ValueError(f"slide_blocks: block_px and tile_px must be >= 1, got {block_px}, {tile_px}")
    size0 = float(np.median(s))
    block0 = block_px * size0 / tile_px  # a block's side in level-0 px
    x0, y0 = float(x.min()), float(y.min())
    if (x + s).max() - x0 <= block0 and (y + s).max() - y0 <= block0:
        return [Block(np.arange(n), np.ones(n, bool))]
    col = np.floor((x + s / 2 - x0) / block0).astype(np.int64)
    row = np.floor((y + s / 2 - y0) / block0).astype(np.int64)
    margin0 = margin_tiles * size0
    blocks = []
    for r, c in sorted(set(zip(row.tolist(), col.tolist(), strict=True))):
        left, top = x0 + c * block0 - margin0, y0 + r * block0 - margin0
        right, bottom = x0 + (c + 1) * block0 + margin0, y0 + (r + 1) * block0 + margin0
        near = (x < right) & (x + s > left) & (y < bottom) & (y + s > top)
        own = (row == r) & (col == c)
        members = np.flatnonzero(near | own)
        blocks.append(Block(members, own[members]))
    return blocks
