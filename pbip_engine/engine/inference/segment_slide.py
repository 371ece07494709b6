"""Segment one slide: plan tiles, predict them in batches, stitch, and write QuPath-ready outputs.

Three separable parts, so the lead's Ray job can put each where it belongs (a task for the plan, a
Ray Data actor pool for :class:`TileReader` + :class:`SegmentPredictor`, one task per slide for
:func:`stitch_and_write`) while :func:`segment_local` chains them in one process (tests, the bench,
``pbip-engine segment`` without a cluster):

(a) :func:`plan` - tissue tiles on an mpp-first grid with overlap (default 25 %); unlike the tile
    stage's grid, the last row/column is shifted to end at the slide border, so every tissue pixel is
    covered (dropping border tiles would leave unsegmented strips).
(b) :class:`SegmentPredictor` - ``{"image": uint8 B,h,w,3, x, y, size0, ...}`` ->
    ``{"logits" (or "probs"): float16 B,C,h',w', x, y, size0, ...}``.
(c) :func:`stitch_and_write` - blends the tiles into a :class:`~pbip_engine.engine.inference.stitch.Canvas`
    at ``output_mpp`` and writes, each atomically:

    * ``<slide>.mask.ome.tif`` - uint8 label pyramid (0 = background, k = class k), deflate, OME-XML
      with the physical pixel size and the class table; mask pixel (i, j) covers level-0 pixels
      [j r, (j+1) r) x [i r, (i+1) r) with r = output_mpp / slide_mpp.
    * ``<slide>.classes.geojson`` - one valid (Multi)Polygon per class in level-0 pixels,
      ``classification {name, color}``, area in µm², vectorised from a mode-downsampled mask.
    * ``<slide>.overlay.png`` - thumbnail with the classes blended in.

Memory is bounded by the tiles in flight, the canvas' open-chunk cache and one band of output rows;
no full-resolution array exists at any point.

This module only gathers the public names; each step lives in its own module: ``plan`` (a), ``predict``
(b), ``fill`` and ``write`` (c), ``local`` (the in-process chain).
"""

from pbip_engine.engine.inference.fill import tile_to_output
from pbip_engine.engine.inference.local import segment_local
from pbip_engine.engine.inference.plan import (
    IMAGE_EXTENSIONS,
    TILE_KEYS,
    SegmentError,
    SegmentPlan,
    open_any,
    open_image_slide,
    plan,
    slide_stem,
)
from pbip_engine.engine.inference.predict import SegmentPredictor, TileReader, iter_tile_pixels
from pbip_engine.engine.inference.write import OUTPUT_SUFFIXES, stitch_and_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "OUTPUT_SUFFIXES",
    "TILE_KEYS",
    "SegmentError",
    "SegmentPlan",
    "SegmentPredictor",
    "TileReader",
    "iter_tile_pixels",
    "open_any",
    "open_image_slide",
    "plan",
    "segment_local",
    "slide_stem",
    "stitch_and_write",
    "tile_to_output",
]
