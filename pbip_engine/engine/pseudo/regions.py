"""Stitched regions for stage 2: the labelled tiles of one slide (or patch image) pasted back together.

Stage 2 used to train on the pseudo-labelled tiles themselves (96-112 px), so the segmenter saw little
context and had to be run on equally small tiles. With overlapping tiles and stitched CAMs the tiles of one
slide describe one consistent picture, so this module pastes their images and masks onto one canvas at the
tiles' pixel scale and cuts it into regions of at most ``region_px`` a side (a GlaS image at 1.24 µm/px is
one region). Stage 2 then draws random scaled crops of its own size from them
(``engine.training.region_crops``), the way OEEM and the gland paper train on crops of whole images.

Pixels no labelled tile covers carry ``IGNORE`` in the mask (and white in the image): they are neither
tissue nor background as far as the pseudo labels know.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.pseudo.stitch import paste_canvas, tile_layout

IGNORE = IGNORE_INDEX  # not scored, not learned from


@dataclass(frozen=True)
class Region:
    """One stitched region: its level-0 origin and extent, and uint8 image ``h,w,3`` + mask ``h,w``."""

    x: int
    y: int
    width0: int
    height0: int
    image: np.ndarray
    mask: np.ndarray


def cuts(length: int, most: int) -> list[tuple[int, int]]:
    """``length`` split into near-equal pieces of at most ``most`` (no sliver at the end)."""
    n = max(1, -(-length // most))
    edges = np.linspace(0, length, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def stitched_regions(
    xs: Sequence[int],
    ys: Sequence[int],
    sizes0: Sequence[int],
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    region_px: int = 512,
) -> list[Region]:
    """The tiles of one slide (level-0 ``xs, ys, sizes0``; uint8 ``h,w,3`` images and ``h,w`` masks at
    the tile scale) as regions of at most ``region_px`` canvas pixels a side.

    Where tiles overlap the later tile wins; with stitched masks (``stitch.stitched_masks``, overlap
    labels ``intersect``) the tiles agree there, so the order does not matter. Regions with no covered
    pixel are dropped.
    """
    if not len(images):
        return []
    if not (len(xs) == len(ys) == len(sizes0) == len(images) == len(masks)):
        raise ValueError(f"regions: {len(xs)} x, {len(ys)} y, {len(sizes0)} sizes, {len(images)} images, "
                         f"{len(masks)} masks")  # fmt: skip
    if region_px < 16:
        raise ValueError(f"region_px must be >= 16, got {region_px}")
    sides = [np.asarray(m).shape[0] for m in masks]
    layout = tile_layout(xs, ys, sizes0, sides)
    scale = max(side / s for side, s in zip(sides, sizes0, strict=True))  # tile_layout's canvas scale
    x0, y0 = min(xs), min(ys)
    image = paste_canvas(layout, [np.asarray(i, np.uint8) for i in images], 255, nearest=False)
    mask = paste_canvas(layout, [np.asarray(m, np.uint8) for m in masks], IGNORE, nearest=True)
    h, w = mask.shape
    out = []
    for ya, yb in cuts(h, region_px):
        for xa, xb in cuts(w, region_px):
            m = mask[ya:yb, xa:xb]
            if not (m != IGNORE).any():
                continue
            out.append(Region(
                x=x0 + round(xa / scale), y=y0 + round(ya / scale),
                width0=round((xb - xa) / scale), height0=round((yb - ya) / scale),
                image=np.ascontiguousarray(image[ya:yb, xa:xb]), mask=np.ascontiguousarray(m),
            ))  # fmt: skip
    return out
