"""Patch datasets (GlaS, BCSS-WSSS, LUAD-HistoSeg, folder+CSV) written as our ``tiles`` Parquet dataset.

Once patches are tiles, every later stage (embed, bank, ClassNet, pseudo masks, stage 2) is the same
code path as for slides. One Parquet file per source image (GlaS) or one for the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pbip_engine.engine.ingest.tile_slide import encode_jpeg, white_fraction
from pbip_engine.engine.io.atomic import atomic_path
from pbip_engine.schemas.datasets import TILES, tile_key

PATCH_FORMATS = ("glas", "bcss_wsss", "luad_histoseg", "folder_csv")


def open_patch_dataset(fmt: str, root: str | Path, split: str = "train", **kw: Any):
    from pbip_engine.engine.ingest.datasets import (
        BCSSWSSSDataset,
        FolderCSVDataset,
        GlaSPatches,
        LUADHistoSegDataset,
    )

    if fmt == "glas":
        return GlaSPatches(root, split=split, **kw)
    if fmt == "bcss_wsss":
        return BCSSWSSSDataset(root, split=split)
    if fmt == "luad_histoseg":
        return LUADHistoSegDataset(root, split=split)
    if fmt == "folder_csv":
        return FolderCSVDataset(root, kw.get("csv", Path(root) / "labels.csv"))
    raise ValueError(f"data.patch_format: unknown {fmt!r}; known: {list(PATCH_FORMATS)}")


def patch_grid(tile_px: int, mpp: float, native_mpp: float, overlap: float) -> dict[str, int]:
    """``GlaSPatches`` keywords that cut a whole-image dataset on the tiling grid at ``mpp``.

    A tile covers ``tile_px * mpp / native_mpp`` native pixels (coordinates and ``size0`` stay native,
    as for slides, so stitching and scoring against the native masks need no special case), consecutive
    tiles start ``(1 - overlap)`` of that apart, and each patch is resized to ``tile_px``.
    """
    patch = max(1, round(tile_px * mpp / native_mpp))
    return {"patch": patch, "stride": max(1, round(patch * (1.0 - overlap))), "out_size": tile_px}


def write_patch_tiles(
    samples: Iterable[dict[str, Any]],
    out_dir: Path,
    mpp: float,
    jpeg_quality: int = 90,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Group samples by source image and write ``out_dir/tiles/<source>.parquet`` atomically."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        src = str(s.get("source") or "patches")
        img = np.asarray(s["image"])
        x, y = int(s.get("x", 0)), int(s.get("y", 0))
        size0 = int(s.get("size0", img.shape[0]))  # native px the (maybe resized) patch covers
        tid = tile_key(src, x, y) if "source" in s else tile_key(str(s["name"]), 0, 0)
        labels = np.asarray(s["labels"]).astype(np.uint8).tolist()
        groups.setdefault(src, []).append(
            {
                "tile_id": tid,
                "slide_id": src if "source" in s else str(s["name"]),
                "x": x,
                "y": y,
                "size0": size0,
                "tile_px": int(img.shape[0]),
                "mpp": float(mpp),
                "level": 0,
                "tissue_fraction": 1.0,
                "white_fraction": white_fraction(img),
                "labelled": bool(sum(labels)),
                "labels": labels,
                "image": encode_jpeg(img, jpeg_quality),
            }
        )
        if progress:
            progress(1)
    folder = out_dir / "tiles"
    folder.mkdir(parents=True, exist_ok=True)
    for src, rows in groups.items():
        with atomic_path(folder / f"{src}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=TILES), tmp, use_compliant_nested_type=False)
    return {"sources": len(groups), "tiles": sum(len(r) for r in groups.values())}
