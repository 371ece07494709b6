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

A tile's blocks follow from its own square and the slide's grid (:class:`BlockGrid`, a few numbers), so the
tiles need not be held together to be blocked: the per-tile path tags each tile's CAM row with the blocks that
read it and Ray Data groups by block (no group holds a whole slide), and the whole-picture path reads one
block's rows from the slide's Parquet at a time.

A slide whose labelled tiles fit in one block (every patch image, the demo's slides) is one block with every
tile kept: its masks are exactly the unblocked ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Block", "BlockGrid"]


@dataclass(frozen=True)
class Block:
    """``members``: indices of the tiles read and stitched together; ``keep`` (bool over ``members``): the
    tiles whose masks this block writes. Every tile is kept by exactly one block."""

    members: np.ndarray
    keep: np.ndarray


@dataclass(frozen=True)
class BlockGrid:
    """One slide's blocks, as a grid any subset of its tiles can be placed on.

    Computed once from the slide's labelled tiles (:meth:`of`), it is small (a few numbers and the list of
    blocks that keep a tile), so it travels to wherever the tiles are: the per-tile actors tag each tile
    with the blocks that read it and Ray Data groups by block, and the whole-picture actors read one block's
    rows at a time with a filter on :meth:`window`. A tile's blocks follow from its own square alone, so both
    give the blocks :meth:`blocks` gives the whole slide held together.

    ``x0, y0``: the grid's anchor (the tiles' top-left corner); ``side0``: a block's side and ``margin0`` the
    ring of context around it, in level-0 px (``side0 = 0``: the slide fits in one block); ``cells``: the
    (row, column) of each block that keeps a tile, in order (a block's index names its files).
    """

    x0: float
    y0: float
    side0: float
    margin0: float
    cells: tuple[tuple[int, int], ...]

    @classmethod
    def of(
        cls,
        xs: Sequence[int],
        ys: Sequence[int],
        sizes0: Sequence[int],
        tile_px: int,
        block_px: int,
        margin_tiles: float = 2.0,
    ) -> BlockGrid:
        """The grid of one slide's tiles (level-0 squares ``x, y, size0`` that become ``tile_px``-px images):
        squares of ``block_px`` canvas px (at the tiles' scale) anchored at the tiles' top-left corner, each
        reading the tiles that reach within ``margin_tiles`` tile sizes of it."""
        if block_px < 1 or tile_px < 1:
            raise ValueError(f"slide blocks: block_px and tile_px must be >= 1, got {block_px}, {tile_px}")
        x, y, s = _squares(xs, ys, sizes0)
        if len(x) == 0:
            return cls(0.0, 0.0, 0.0, 0.0, ())
        size0 = float(np.median(s))
        side0 = block_px * size0 / tile_px
        x0, y0 = float(x.min()), float(y.min())
        if (x + s).max() - x0 <= side0 and (y + s).max() - y0 <= side0:
            return cls(x0, y0, 0.0, 0.0, ((0, 0),))
        grid = cls(x0, y0, side0, margin_tiles * size0, ())
        row, col = grid._cell(x, y, s)
        return replace(grid, cells=tuple(sorted(set(zip(row.tolist(), col.tolist(), strict=True)))))

    def __len__(self) -> int:
        return len(self.cells)

    def name(self, slide_id: str, k: int) -> str:
        """Block ``k``'s file name stem: the slide id when the slide is one block, ``<slide>.b<k>`` otherwise."""
        return slide_id if len(self.cells) == 1 else f"{slide_id}.b{k}"

    def window(self, k: int) -> tuple[float, float, float, float]:
        """Block ``k`` with its ring of context, ``(left, top, right, bottom)`` in level-0 px: it reads the
        tiles whose squares reach into this window, and keeps those whose centres fall in the block."""
        if self.side0 == 0:
            return (-np.inf, -np.inf, np.inf, np.inf)
        r, c = self.cells[k]
        return (self.x0 + c * self.side0 - self.margin0, self.y0 + r * self.side0 - self.margin0,
                self.x0 + (c + 1) * self.side0 + self.margin0, self.y0 + (r + 1) * self.side0 + self.margin0)  # fmt: skip

    def select(
        self, k: int, xs: Sequence[int], ys: Sequence[int], sizes0: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which tiles block ``k`` reads and stitches (those reaching into its window, and those it keeps), and
        which it keeps (writes the masks of: those whose centres fall in the block); two bool arrays."""
        x, y, s = _squares(xs, ys, sizes0)
        if self.side0 == 0:
            every = np.ones(len(x), bool)
            return every, every
        row, col = self._cell(x, y, s)
        keeps = (row == self.cells[k][0]) & (col == self.cells[k][1])
        left, top, right, bottom = self.window(k)
        near = (x < right) & (x + s > left) & (y < bottom) & (y + s > top)
        return near | keeps, keeps

    def blocks(self, xs: Sequence[int], ys: Sequence[int], sizes0: Sequence[int]) -> list[Block]:
        """The blocks of tiles held together (the slide's, or any of its tiles): each reads its members and
        keeps those whose centres fall in it; members in index order."""
        blocks = []
        for k in range(len(self)):
            reads, keeps = self.select(k, xs, ys, sizes0)
            members = np.flatnonzero(reads)
            blocks.append(Block(members, keeps[members]))
        return blocks

    def _cell(self, x: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row = np.floor((y + s / 2 - self.y0) / self.side0).astype(np.int64)
        col = np.floor((x + s / 2 - self.x0) / self.side0).astype(np.int64)
        return row, col


def _squares(xs: Sequence[int], ys: Sequence[int], sizes0: Sequence[int]) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v, np.float64).reshape(-1) for v in (xs, ys, sizes0))
