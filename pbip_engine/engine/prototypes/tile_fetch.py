"""Tile pixels by tile id, for the prototype gallery: the bank knows tile ids, the pixels stay in the tiles
dataset, and only the few slides that hold a prototype's members are read."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


def tile_fetcher(files: Iterable[Path]) -> Callable[[str], np.ndarray]:
    """tile_id -> RGB pixels, reading only the slides' Parquet files that hold the requested tiles.

    ``files`` are the tiles dataset's per-slide files (named by slide id). The returned function has a
    ``prefetch(tile_ids)`` attribute that reads many tiles with one pass per slide file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pbip_engine.engine.ingest.datasets.common import decode_rgb

    by_id = {f.stem: f for f in files}
    cache: dict[str, np.ndarray] = {}

    def prefetch(tile_ids: list[str]) -> None:
        by_slide: dict[str, list[str]] = {}
        for t in tile_ids:
            by_slide.setdefault(t.rsplit(":", 2)[0], []).append(t)
        for sid, ids in by_slide.items():
            table = pq.read_table(by_id[sid], columns=["tile_id", "image"])
            table = table.filter(pc.is_in(table["tile_id"], value_set=pa.array(ids)))
            for tid, img in zip(table["tile_id"].to_pylist(), table["image"].to_pylist(), strict=True):
                cache[tid] = decode_rgb(img, tid)

    def fetch(tile_id: str) -> np.ndarray:
        if tile_id not in cache:
            prefetch([tile_id])
        return cache[tile_id]

    fetch.prefetch = prefetch  # type: ignore[attr-defined]
    return fetch
