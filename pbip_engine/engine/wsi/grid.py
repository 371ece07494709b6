"""Tile start positions along one axis: the one grid every tiler (tile stage, inference, GlaS patches) uses.

The stages differ only in what happens at the far edge, so that is the single option:

* ``"skip"`` - whole tiles only; the strip after the last one is left out. The tile stage's choice: a
  training tile must be real pixels, and a border strip is rarely tissue.
* ``"cover"`` - an extra tile flush with the end covers that strip; a length shorter than one tile gets
  none. For fixed-size training patches cut from images (GlaS), which must not be padded.
* ``"overhang"`` - like ``"cover"``, but a length shorter than one tile still gets one tile at 0 that hangs
  over the end (the reader pads it). Inference: every pixel must be predicted.

Starts are ``round(k * stride)``, so a fractional stride (an overlap at a resolution that is not the
slide's) does not drift over a long slide.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Edge = Literal["skip", "cover", "overhang"]
EDGES: tuple[str, ...] = ("skip", "cover", "overhang")


def grid_positions(length: int, size: int, stride: float, edge: Edge = "skip") -> np.ndarray:
    """Sorted int64 tile starts along an axis of ``length`` pixels for tiles of ``size``, ``stride`` apart."""
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    if size < 1 or stride <= 0:
        raise ValueError(f"size must be >= 1 and stride > 0, got size={size}, stride={stride}")
    if length < size:
        return np.zeros(1 if edge == "overhang" else 0, np.int64)
    n = math.floor((length - size) / stride) + 1
    pos = np.round(np.arange(n) * stride).astype(np.int64)
    pos = pos[pos + size <= length]
    if edge != "skip" and pos[-1] + size < length:
        pos = np.append(pos, length - size)
    return pos
