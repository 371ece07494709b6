"""Prototype atlas: one row per learned prototype, its most activated tiles with where it fires.

The counterpart of the bank's gallery for prototypes that are learned rather than clustered: a learned
prototype has no member tiles, so each row shows the tiles on which it responds most, each overlaid with
the prototype's activation map, which tells a pathologist what tissue pattern (and which part of the tile)
the prototype has come to stand for, and whether two prototypes of a class look at the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pbip_engine.engine.prototypes.gallery import EMPTY_BG, label_cell, thumbnail, write_png

HEAT_ALPHA = 0.45


@dataclass
class AtlasRow:
    """One prototype: its caption lines and its (tile RGB uint8, activation map in [0, 1]) pairs, best first."""

    caption: list[str]
    tiles: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def heat_thumb(tile: np.ndarray, heat: np.ndarray, thumb: int, tile_id: str = "") -> np.ndarray:
    """The tile at ``thumb`` px with its activation map (any size, [0, 1]) blended in as a jet colour map."""
    base = thumbnail(tile, tile_id, thumb)
    h = cv2.resize(
        np.clip(np.asarray(heat, np.float32), 0, 1), (thumb, thumb), interpolation=cv2.INTER_LINEAR
    )
    jet = cv2.cvtColor(cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(base, 1 - HEAT_ALPHA, jet, HEAT_ALPHA, 0)


def write_atlas(path: str | Path, rows: Sequence[AtlasRow], per_row: int = 6, thumb: int = 96) -> Path:
    """Write the atlas PNG (atomically): per row a caption cell, then up to ``per_row`` tile cells."""
    if not rows:
        raise ValueError("atlas: no prototypes to draw")
    if per_row < 1 or thumb < 16:
        raise ValueError(f"atlas: per_row must be >= 1 and thumb >= 16 (got {per_row}, {thumb})")
    h, w = len(rows) * thumb, (per_row + 1) * thumb
    sheet = np.full((h, w, 3), EMPTY_BG, np.uint8)
    for r, row in enumerate(rows):
        y = r * thumb
        sheet[y : y + thumb, :thumb] = label_cell(row.caption, thumb)
        for col, (tile, heat) in enumerate(row.tiles[:per_row]):
            x = (col + 1) * thumb
            sheet[y : y + thumb, x : x + thumb] = heat_thumb(tile, heat, thumb)
        cv2.line(sheet, (0, y), (w - 1, y), (255, 255, 255), 1)
    return write_png(path, sheet, "atlas")
