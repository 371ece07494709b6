"""Tile rows as datasets store them (encoded image bytes, label lists, mask PNGs) -> the arrays a training
step or a CAM pass takes; shared by the Ray Train workers, the pseudo actors and the Ray-free path."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np


def decode_batch(batch: dict[str, Any], stack: bool = True) -> dict[str, Any]:
    """Ray Data numpy batch of tile rows -> the engine's batch convention (uint8 B,H,W,3 + multi-hot).

    ``stack=False`` keeps a list of images (regions of different sizes)."""
    from pbip_engine.engine.ingest.datasets.common import decode_rgb

    images = [decode_rgb(b) for b in batch["image"]]
    images = np.stack(images) if stack else images
    out = {"image": images, "name": batch["tile_id"]}
    if "labels" in batch:
        out["labels"] = np.stack([np.asarray(v, dtype=np.float32) for v in batch["labels"]])
    return out


def decode_masks(pngs: Iterable[bytes], stack: bool = True) -> np.ndarray | list[np.ndarray]:
    """Palettised PNG bytes -> uint8 index masks (PIL keeps the indices; cv2 would give colours)."""
    from PIL import Image

    masks = [np.asarray(Image.open(io.BytesIO(b))) for b in pngs]
    return np.stack(masks) if stack else masks


def decode_samples(batch: dict[str, Any]) -> dict[str, Any]:
    """Pseudo samples (tile JPEG + mask PNG rows) -> ``{"image": uint8 B,H,W,3, "mask": uint8 B,H,W}``."""
    out = decode_batch({"image": batch["image"], "tile_id": batch["tile_id"]})
    out["mask"] = decode_masks(batch["mask"])
    if "labelled" in batch:  # semi-supervised stage 2: which rows carry a mask (the others are all-ignore)
        out["labelled"] = np.asarray(batch["labelled"], dtype=bool)
    return out
