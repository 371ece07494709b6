"""Patch datasets become the same tiles dataset as slides (GlaS OEEM patches here)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pbip_engine.engine.ingest.datasets.common import decode_rgb
from pbip_engine.engine.ingest.patch_tiles import open_patch_dataset, write_patch_tiles
from pbip_engine.schemas.datasets import TILES


def test_glas_patches_to_tiles(glas_dir: Path, tmp_path: Path) -> None:
    ds = open_patch_dataset("glas", glas_dir, split="train")
    samples = list(islice((ds[i] for i in range(len(ds))), 150))
    counts = write_patch_tiles(samples, tmp_path, mpp=0.62)
    assert counts["tiles"] == 150 and counts["sources"] >= 1
    f = sorted((tmp_path / "tiles").glob("*.parquet"))[0]
    t = pq.read_table(f)
    assert t.schema.remove_metadata().equals(TILES.remove_metadata())
    row = t.slice(0, 1).to_pylist()[0]
    first = samples[0]
    assert row["tile_id"] == f"{first['source']}:{first['x']}:{first['y']}"
    assert row["labels"] == np.asarray(first["labels"]).astype(int).tolist()
    img = decode_rgb(row["image"])
    assert img.shape == (112, 112, 3)
    assert np.abs(img.astype(int) - first["image"].astype(int)).mean() < 6  # JPEG round trip
    assert not list((tmp_path / "tiles").rglob(".*.tmp")) and not (tmp_path / "tiles" / ".pbip-tmp").exists()


def test_glas_patches_follow_the_tiling_grid(glas_dir: Path, tmp_path: Path) -> None:
    """At twice the native µm/px a 112-px tile covers 224 native px; coordinates and size0 stay native."""
    from pbip_engine.engine.ingest.patch_tiles import patch_grid

    grid = patch_grid(tile_px=112, mpp=1.24, native_mpp=0.62, overlap=0.5)
    assert grid == {"patch": 224, "stride": 112, "out_size": 112}
    assert patch_grid(112, 0.62, 0.62, 0.0) == {"patch": 112, "stride": 112, "out_size": 112}
    native = open_patch_dataset("glas", glas_dir, split="train")
    coarse = open_patch_dataset("glas", glas_dir, split="train", **grid)
    assert len(coarse) < len(native) / 2  # 4x fewer native px per tile area, same overlap
    s = coarse[0]
    assert s["image"].shape == (112, 112, 3) and s["size0"] == 224
    write_patch_tiles([s], tmp_path, mpp=1.24)
    row = pq.read_table(sorted((tmp_path / "tiles").glob("*.parquet"))[0]).to_pylist()[0]
    assert (row["size0"], row["tile_px"]) == (224, 112) and abs(row["mpp"] - 1.24) < 1e-6  # float32
