"""Pseudo masks against truth where a run has it (the synthetic cohort; patch sets that ship masks).

Truth is read lazily at level 0 and cropped per tile, so scoring a cohort never holds a whole slide's
mask in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def truth_region(truth: Any, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
    """Level-0 truth crop resized (nearest) to the tile's pixel grid."""
    import cv2

    crop = np.asarray(truth[y : y + size0, x : x + size0])
    return cv2.resize(crop, (out_px, out_px), interpolation=cv2.INTER_NEAREST)


def open_truth(path: Path) -> Any:
    """Level 0 of a label pyramid as a lazily read array (zarr over the TIFF's tiles)."""
    import tifffile
    import zarr

    store = tifffile.imread(str(path), aszarr=True, level=0)
    return zarr.open(store, mode="r")


def synth_truth(truth_dir: Path) -> Callable[[str], Any]:
    """Slide id -> lazily read level-0 truth of the synthetic cohort (None where there is none)."""

    def get(sid: str) -> Any:
        p = truth_dir / f"{sid}.mask.tif"
        return open_truth(p) if p.exists() else None

    return get


def patch_truth(fmt: str, root: str) -> Callable[[str], Any] | None:
    """Source image -> its mask in our convention, for patch datasets that ship masks (GlaS); else None."""
    from pbip_engine.engine.ingest.datasets.common import DataError
    from pbip_engine.engine.ingest.patch_tiles import open_patch_dataset

    ds = open_patch_dataset(fmt, root, split="train")
    if not hasattr(ds, "mask"):
        return None

    def get(sid: str) -> Any:
        try:
            return ds.mask(sid)
        except DataError:
            return None

    return get


def score_pseudo(
    index: list[dict[str, Any]], out_dir: Path, truth_for: Callable[[str], Any], n_classes: int
) -> dict:
    """Pseudo masks vs truth over all tiles: one confusion matrix, pixels whose truth is a tissue class.

    ``multi_label`` repeats the scores over tiles labelled with two or more classes: on a single-label
    tile the mask is that class plus the background rule whatever the CAMs say, so only these tiles
    show how well the model localises (the L_CLS vs + L_SIM ablation reads this figure).
    """
    from pbip_engine.engine.metrics import SegmentationMeter, read_mask

    meter = SegmentationMeter(n_classes, ignore_background=True)
    multi = SegmentationMeter(n_classes, ignore_background=True)
    truths: dict[str, Any] = {}
    for row in index:
        sid = row["slide_id"]
        if sid not in truths:
            truths[sid] = truth_for(sid)
        if truths[sid] is None:
            continue
        pred = read_mask(out_dir / row["mask_path"])
        truth = truth_region(truths[sid], row["x"], row["y"], row["size0"], pred.shape[0])
        meter.update(pred, truth, name=sid)
        if np.asarray(row.get("labels", ())).sum() > 1:  # a list, or an ndarray from Ray's tensor columns
            multi.update(pred, truth, name=sid)
    if not meter.n_images:
        return {}
    out = meter.compute()
    if multi.n_images:
        out["multi_label"] = multi.compute()
    return out
