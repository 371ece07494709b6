"""Everything the ``tile`` stage does for one slide: the unit of work a Ray task maps.

open → tissue (detected, or an ROI GeoJSON fed back) → mpp-first grid → read tiles in row runs →
JPEG + labels → one Parquet file with :data:`pbip_engine.schemas.datasets.TILES`, plus a QC thumbnail
and the tissue outline as an editable QuPath GeoJSON.

Slide-level problems (unreadable file, no mpp, no tissue, bad annotations) never raise: they return
``SlideResult(status="failed", reason=<code>, message=<text>)`` and leave nothing behind, so one bad
slide out of ten thousand is a row in a report, not a crashed job. All outputs go to temp files in
their final directories and are renamed into place at the end (:func:`atomic_path`), the Parquet file
last: its presence means the slide is complete.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pbip_engine.engine.annotations.tile_labels import LabelError, TileLabeler
from pbip_engine.engine.io.atomic import atomic_path
from pbip_engine.engine.wsi.slides import DEFAULT_BACKENDS, MAX_PIXELS_PER_BYTE, SlideError, open_slide
from pbip_engine.engine.wsi.tiling import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_MAX_RUN_PX,
    TileGridParams,
    iter_tiles,
    plan_tiles,
    read_level_for,
)
from pbip_engine.engine.wsi.tissue import (
    TissueParams,
    TissueResult,
    detect_tissue,
    detection_downsample,
    tissue_from_geometry,
    tissue_qc_png,
)
from pbip_engine.schemas.datasets import TILES, tile_key

WHITE_GREY = 220  # a pixel is "white" when its grey level (ITU-R 601 luma) is > this
ROW_GROUP_TILES = 512
HOLD_MAX_PIXELS = 1 << 25  # 33.5 MP, 100 MB of RGB: hold a level shared by tissue pass and tiles up to this
TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (0, 200, 0)
_UNSAFE_ID = re.compile(r"[/\\\x00]|^\.|^$")  # path separators, NUL, hidden/relative names


@dataclass
class SlideResult:
    slide_id: str
    status: Literal["done", "failed"]
    reason: str | None  # short code: missing, unreadable, read_failed, no_mpp, no_tissue, no_tiles, labels...
    n_tiles: int
    n_labelled: int
    backend: str | None
    mpp: float | None
    mpp_source: str | None
    seconds: float
    tiles_per_s: float
    message: str | None = None  # full error text (starts with the slide path) when failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def white_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels whose grey level is > 220 (background glass / fat)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(np.count_nonzero(grey > WHITE_GREY)) / grey.size


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def output_paths(out_dir: Path, slide_id: str) -> dict[str, Path]:
    """Where :func:`tile_slide` writes for ``slide_id`` (the Parquet file marks completion)."""
    out_dir = Path(out_dir)
    return {
        "tiles": out_dir / "tiles" / f"{slide_id}.parquet",
        "qc_png": out_dir / "qc" / f"{slide_id}.tissue.png",
        "qc_geojson": out_dir / "qc" / f"{slide_id}.tissue.geojson",
    }


def tile_slide(
    path: str | Path,
    slide_id: str,
    out_dir: Path,
    *,
    class_names: list[str],
    grid: TileGridParams,
    tissue: TissueParams,
    annotations: Path | None = None,
    slide_labels: list[int] | None = None,
    label_min_fraction: float = 0.1,
    mpp_override: float | None = None,
    jpeg_quality: int = 90,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    progress: Callable[[int], None] | None = None,
    roi: Path | None = None,
    max_run_px: int = DEFAULT_MAX_RUN_PX,
    encode_threads: int = 1,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE,
) -> SlideResult:
    """Tile one slide into ``out_dir/tiles/<slide_id>.parquet`` (+ QC); never raises for bad slides.

    ``progress`` is called with the number of tiles written since the previous call. ``roi`` is a
    GeoJSON of level-0 polygons (e.g. the edited ``qc/<id>.tissue.geojson``) used instead of detection.
    ``max_run_px`` caps the width of one batched read (0 = tile by tile). ``encode_threads`` threads
    JPEG-encode while the next row is read; 0 encodes inline, which is right for a worker that holds one CPU: the
    thread would take a core that Ray gave to another worker.
    """
    if _UNSAFE_ID.search(slide_id):
        raise ValueError(
            f"slide_id {slide_id!r} becomes a file name: no '/', '\\', NUL or leading '.' allowed"
        )
    if annotations is not None and slide_labels is not None:
        raise ValueError(f"{path}: give annotations or slide_labels, not both")
    if encode_threads < 0:
        raise ValueError(f"encode_threads must be ≥ 0, got {encode_threads}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    t0 = time.perf_counter()
    state: dict[str, Any] = {"backend": None, "mpp": None, "mpp_source": None}

    def failed(reason: str, message: str) -> SlideResult:
        return SlideResult(
            slide_id, "failed", reason, 0, 0, state["backend"], state["mpp"], state["mpp_source"],
            time.perf_counter() - t0, 0.0, message,
        )  # fmt: skip

    try:
        labeler = _labeler(path, class_names, annotations, slide_labels, label_min_fraction)
    except LabelError as e:
        return failed("labels", str(e))

    paths = output_paths(out_dir, slide_id)
    try:
        with (
            open_slide(
                path, mpp_override=mpp_override, backends=backends, max_pixels_per_byte=max_pixels_per_byte
            ) as slide,
            ExitStack() as outputs,
        ):
            state.update(backend=slide.backend, mpp=slide.mpp, mpp_source=slide.mpp_source)
            if roi is None:
                _hold_shared_level(slide, grid, tissue)
            tis = _tissue(slide, tissue, roi)
            tiles = plan_tiles(slide, tis, grid)
            if not tiles:
                return failed(
                    "no_tiles",
                    f"{slide.path}: no {grid.tile_px}px tile at {grid.mpp} µm/px has tissue fraction ≥ "
                    f"{grid.min_tissue} ({tis.area_um2 / 1e6:.3f} mm² of tissue)",
                )
            tile_mpp = tiles[0].size0 * float(slide.mpp) / grid.tile_px  # type: ignore[arg-type]
            # All three appear together or not at all; the tile file last (LIFO exit), as readers look for it.
            tmp_parquet, tmp_geojson, tmp_png = (
                outputs.enter_context(atomic_path(paths[k], keep_suffix=True))
                for k in ("tiles", "qc_geojson", "qc_png")
            )
            n_tiles, n_labelled = _write_tiles(
                slide, tiles, slide_id, tmp_parquet, grid.tile_px, tile_mpp, labeler, len(class_names),
                jpeg_quality,
                progress, max_run_px, encode_threads,
            )  # fmt: skip
            tissue_qc_png(tis, tmp_png)
            _write_tissue_geojson(tmp_geojson, tis, slide_id)
    except SlideError as e:
        return failed(e.reason, str(e))
    except LabelError as e:
        return failed("labels", str(e))
    seconds = time.perf_counter() - t0
    return SlideResult(
        slide_id, "done", None, n_tiles, n_labelled, state["backend"], state["mpp"], state["mpp_source"],
        seconds, n_tiles / seconds if seconds > 0 else 0.0,
    )  # fmt: skip


def _labeler(
    path: str | Path,
    class_names: list[str],
    annotations: Path | None,
    slide_labels: list[int] | None,
    min_fraction: float,
) -> TileLabeler | None:
    if annotations is not None:
        return TileLabeler.from_geojson(annotations, class_names, min_fraction=min_fraction)
    if slide_labels is not None:
        if len(slide_labels) != len(class_names):
            raise LabelError(
                f"{path}: slide label {slide_labels} has {len(slide_labels)} entries for "
                f"{len(class_names)} classes {class_names}"
            )
        return TileLabeler.from_slide_labels(slide_labels)
    return None


def _hold_shared_level(slide: Any, grid: TileGridParams, tissue: TissueParams) -> None:
    """Decode once what tissue detection and the tiles would both decode: a small level they share."""
    if slide.mpp is None:
        return  # detection fails with its own message
    tile_level, _ = read_level_for(slide, grid.mpp, warn=False)  # plan_tiles warns, once
    if slide.best_level_for_downsample(detection_downsample(slide, tissue.target_mpp)) != tile_level:
        return
    w, h = slide.level_dimensions[tile_level]
    if w * h <= HOLD_MAX_PIXELS:
        slide.hold_level(tile_level)


def _tissue(slide: Any, params: TissueParams, roi: Path | None) -> TissueResult:
    if roi is None:
        return detect_tissue(slide, params)
    import shapely

    from pbip_engine.engine.annotations.geojson import read_annotations

    try:
        geoms = [a.geometry for a in read_annotations(roi) if a.geometry is not None]
    except Exception as e:
        raise SlideError(slide.path, "bad_roi", f"cannot read ROI {roi}: {e}") from e
    geoms = [g if g.is_valid else shapely.make_valid(g) for g in geoms]
    return tissue_from_geometry(slide, shapely.union_all(geoms) if geoms else None, params)


def _write_tiles(
    slide: Any,
    tiles: list[Any],
    slide_id: str,
    tmp: Path,
    tile_px: int,
    tile_mpp: float,
    labeler: TileLabeler | None,
    n_classes: int,
    quality: int,
    progress: Callable[[int], None] | None,
    max_run_px: int,
    encode_threads: int,
) -> tuple[int, int]:
    n_classes_empty = np.zeros(n_classes, np.uint8)
    cols: dict[str, list[Any]] = {f.name: [] for f in TILES}
    n_tiles = n_labelled = 0
    # JPEG encoding (~0.17 ms per 224² tile, ~40 % of a batched read) can run on threads that overlap the
    # next reads: cv2 releases the GIL. Futures are resolved at each row-group flush, so memory stays bounded.
    encoder: ThreadPoolExecutor | _Inline = (
        ThreadPoolExecutor(max_workers=encode_threads, thread_name_prefix="jpeg")
        if encode_threads
        else _Inline()
    )
    try:
        # JPEG bytes do not compress; use_compliant_nested_type=False keeps the list item named "item", so
        # the schema read back equals TILES exactly (Parquet's default renames it "element").
        with pq.ParquetWriter(tmp, TILES, compression="none", use_compliant_nested_type=False) as writer:

            def flush() -> None:
                nonlocal cols
                if cols["tile_id"]:
                    done = [f.result() for f in cols["image"]]
                    cols["image"] = [d[0] for d in done]
                    cols["white_fraction"] = [d[1] for d in done]
                    writer.write_table(pa.Table.from_pydict(cols, schema=TILES))
                    if progress is not None:
                        progress(len(cols["tile_id"]))
                    cols = {f.name: [] for f in TILES}

            # Rows are keyed by tile_id, so the block order of multi-row reads is fine here.
            for t, rgb in iter_tiles(
                slide, tiles, tile_px, max_run_px=max_run_px, max_rows=DEFAULT_BLOCK_ROWS
            ):
                if labeler is not None:
                    labelled, labels = labeler.label(t.x, t.y, t.size0)
                else:
                    labelled, labels = False, n_classes_empty
                cols["tile_id"].append(tile_key(slide_id, t.x, t.y))
                cols["slide_id"].append(slide_id)
                cols["x"].append(t.x)
                cols["y"].append(t.y)
                cols["size0"].append(t.size0)
                cols["tile_px"].append(tile_px)
                cols["mpp"].append(tile_mpp)
                cols["level"].append(t.level)
                cols["tissue_fraction"].append(t.tissue_fraction)
                cols["labelled"].append(labelled)
                cols["labels"].append(labels.tolist())
                cols["image"].append(encoder.submit(_encode_tile, rgb, quality))
                n_tiles += 1
                n_labelled += int(labelled)
                if len(cols["tile_id"]) >= ROW_GROUP_TILES:
                    flush()
            flush()
    finally:
        encoder.shutdown(wait=True, cancel_futures=True)
    return n_tiles, n_labelled


class _Inline:
    """The executor interface, run in the calling thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _encode_tile(rgb: np.ndarray, quality: int) -> tuple[bytes, float]:
    return encode_jpeg(rgb, quality), white_fraction(rgb)


def _write_tissue_geojson(path: Path, tis: TissueResult, slide_id: str) -> None:
    from pbip_engine.engine.annotations.geojson import Annotation, write_annotations

    ann = Annotation(
        TISSUE_CLASS,
        TISSUE_COLOR,
        tis.polygons,
        measurements={"area_um2": float(tis.area_um2)},
    )
    write_annotations(path, [ann], object_type="annotation", id_seed=f"{slide_id}/tissue")
