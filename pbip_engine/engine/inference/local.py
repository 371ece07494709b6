"""Segment one slide in this process, without Ray: plan -> read + predict in batches -> stitch and write.

For tests, the bench and ``pbip-engine segment`` without a cluster; ``jobs/infer`` runs the same three
steps with the reading and prediction in a Ray Data actor pool. Tile decoding runs in a background
thread a few batches ahead, so it overlaps inference.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.engine.inference import SEGMENT_OVERLAP
from pbip_engine.engine.inference.plan import open_any, plan
from pbip_engine.engine.inference.predict import iter_tile_pixels
from pbip_engine.engine.inference.write import stitch_and_write
from pbip_engine.engine.wsi.tissue import TissueParams


def _prefetch(it: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (tile decode overlaps inference)."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    th = threading.Thread(target=work, daemon=True, name="tile-prefetch")
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def segment_local(
    slide_path: str | Path,
    predictor: Any,
    out_dir: str | Path,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]] | None = None,
    *,
    model_mpp: float,
    tile_px: int = 512,
    overlap: float = SEGMENT_OVERLAP,
    output_mpp: float | None = None,
    batch_size: int = 16,
    tissue_params: TissueParams | None = None,
    mpp_override: float | None = None,
    use_tissue: bool = True,
    prefetch: int = 2,
    **write_kwargs: Any,
) -> dict[str, Any]:
    """plan -> read + predict in batches -> stitch_and_write, in this process (no Ray).

    ``predictor`` is any callable with :class:`SegmentPredictor`'s batch contract. ``output_mpp``
    defaults to ``model_mpp``. Returns :func:`stitch_and_write`'s statistics plus plan/read/infer times.
    """
    t0 = time.perf_counter()
    p = plan(
        slide_path,
        model_mpp,
        tile_px,
        overlap,
        tissue_params,
        mpp_override=mpp_override,
        use_tissue=use_tissue,
    )
    t_plan = time.perf_counter() - t0
    timing = {"read_s": 0.0, "infer_s": 0.0}

    def batches() -> Iterator[dict[str, np.ndarray]]:
        with open_any(slide_path, mpp_override) as slide:
            pix = iter_tile_pixels(slide, p.tiles, tile_px)
            for i in range(0, len(p.tiles), batch_size):
                tb = time.perf_counter()
                chunk = p.tiles[i : i + batch_size]
                images = np.stack([next(pix)[1] for _ in chunk])
                timing["read_s"] += time.perf_counter() - tb
                yield {
                    "image": images,
                    "x": np.array([t.x for t in chunk], np.int64),
                    "y": np.array([t.y for t in chunk], np.int64),
                    "size0": np.array([t.size0 for t in chunk], np.int64),
                }

    def predicted() -> Iterator[dict[str, Any]]:
        for b in _prefetch(batches(), prefetch):
            ti = time.perf_counter()
            out = predictor(b)
            timing["infer_s"] += time.perf_counter() - ti
            yield out

    restrict = bool(write_kwargs.pop("restrict_to_tissue", True)) and use_tissue
    stats = stitch_and_write(
        slide_path,
        predicted(),
        out_dir,
        class_names,
        class_colors,
        output_mpp or model_mpp,
        mpp_override=mpp_override,
        tissue=p.tissue,
        restrict_to_tissue=restrict,
        **write_kwargs,
    )
    stats.update(
        {
            "plan_s": t_plan,
            "read_s": timing["read_s"],  # in the prefetch thread: overlaps inference
            "infer_s": timing["infer_s"],
            "model_mpp": float(model_mpp),
            "tile_px": int(tile_px),
            "overlap": float(overlap),
            "total_s": time.perf_counter() - t0,
        }
    )
    stats["tissue_mpix_per_s"] = stats["tissue_mpix"] / stats["total_s"] if stats["total_s"] > 0 else math.nan
    return stats
