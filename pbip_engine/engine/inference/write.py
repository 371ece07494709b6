"""Step (c) of segmenting a slide: blend the tile maps, then write QuPath-ready outputs, each atomically.

* ``<slide>.mask.ome.tif`` - uint8 label pyramid (0 = background, k = class k), deflate, OME-XML with the
  physical pixel size and the class table; mask pixel (i, j) covers level-0 pixels
  [j r, (j+1) r) x [i r, (i+1) r) with r = output_mpp / slide_mpp.
* ``<slide>.classes.geojson`` - one valid (Multi)Polygon per class in level-0 pixels,
  ``classification {name, color}``, area in µm², vectorised from a mode-downsampled mask.
* ``<slide>.overlay.png`` - thumbnail with the classes blended in.
* ``<slide>.overlay.ome.tif`` - the same blend as an RGB OME-TIFF pyramid (≤ ``overlay_max_px`` a side)
  whose pixel size lines it up with the slide, for QuPath.

The label mask is read back from the canvas once, band by band, while the TIFF is written; the same pass
counts pixels per class and keeps the small mode-downsampled copy that GeoJSON and the overlay use, so no
full-resolution array exists at any point.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.annotations.geojson import Annotation, mask_to_geometries, write_annotations
from pbip_engine.engine.inference.fill import fill_canvas
from pbip_engine.engine.inference.plan import SegmentError, open_any, slide_stem
from pbip_engine.engine.inference.stitch import Canvas, drop_stale_canvases
from pbip_engine.engine.io.atomic import TEMP_DIR
from pbip_engine.engine.outputs.overlay import default_colors, write_overlay, write_overlay_pyramid
from pbip_engine.engine.outputs.tiff_writer import write_pyramid
from pbip_engine.engine.wsi.tissue import TissueParams, TissueResult, detect_tissue

OUTPUT_SUFFIXES = {
    "mask": ".mask.ome.tif",
    "geojson": ".classes.geojson",
    "overlay": ".overlay.png",
    "overlay_tiff": ".overlay.ome.tif",
}


def _mode_downsample(band: np.ndarray, f: int, n_labels: int) -> np.ndarray:
    """f x f block mode of a uint8 band (partial blocks at the edges count only real pixels)."""
    if f == 1:
        return band
    h, w = band.shape
    hb, wb = math.ceil(h / f), math.ceil(w / f)
    padded = np.full((hb * f, wb * f), 255, np.uint8)
    padded[:h, :w] = band
    blocks = padded.reshape(hb, f, wb, f)
    best = np.zeros((hb, wb), np.uint8)
    best_n = np.full((hb, wb), -1, np.int32)
    for k in range(n_labels):  # ties go to the larger label, as tiff_writer's mode does
        n = (blocks == k).sum(axis=(1, 3), dtype=np.int32)
        take = (n >= best_n) & (n > 0)
        best[take] = k
        best_n[take] = n[take]
    return best


class MaskBands:
    """``read_tile`` callback for write_pyramid: one argmax band per tile row, with running statistics.

    The TIFF writer asks for level-0 tiles row by row, left to right; each band is computed once from the
    canvas (restricted to tissue), and on the way the exact per-class pixel counts and a mode-downsampled
    copy (for GeoJSON and the overlay) are collected.
    """

    def __init__(
        self, canvas: Canvas, tissue: TissueResult | None, r: float, n_labels: int, geo_factor: int
    ) -> None:
        self.canvas, self.tissue, self.r = canvas, tissue, r
        self.n_labels, self.f = n_labels, geo_factor
        H, W = canvas.shape
        self.counts = np.zeros(max(256, n_labels), np.int64)
        self.small = np.zeros((math.ceil(H / geo_factor), math.ceil(W / geo_factor)), np.uint8)
        self._y, self._band = -1, None
        if tissue is not None:
            # Grown by one mask pixel: the coarse (8 µm/px) mask must not cut tissue edges; the model's own
            # background class decides inside that margin, the mask only removes far-off false positives.
            self._tmask = cv2.dilate(tissue.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            # Tissue mask column of every output column (pixel centre), computed once.
            self._tx = np.clip(
                ((np.arange(W) + 0.5) * r / tissue.downsample).astype(np.int64), 0, tissue.mask.shape[1] - 1
            )

    def band(self, y: int, h: int) -> np.ndarray:
        if y != self._y or self._band is None or self._band.shape[0] != h:
            band = self.canvas.argmax_tile(y, 0, h, self.canvas.shape[1])
            if self.tissue is not None:
                ty = np.clip(
                    ((np.arange(y, y + h) + 0.5) * self.r / self.tissue.downsample).astype(np.int64),
                    0,
                    self.tissue.mask.shape[0] - 1,
                )
                band[~self._tmask[ty][:, self._tx]] = 0
            self.counts += np.bincount(band.ravel(), minlength=self.counts.size)
            if y % self.f:
                raise SegmentError(f"band start {y} is not a multiple of the GeoJSON factor {self.f}")
            small = _mode_downsample(band, self.f, self.n_labels)
            self.small[y // self.f : y // self.f + small.shape[0]] = small
            self._y, self._band = y, band
        return self._band

    def __call__(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.band(y, h)[:, x : x + w]


def class_table(
    slide_path: Path, class_names: Sequence[str], class_colors: Sequence[Sequence[int]] | None
) -> tuple[list[str], list[tuple[int, ...]]]:
    """Names as strings and one RGB colour each (defaults when none are given); fails before any work."""
    names = [str(n) for n in class_names]
    if not names:
        raise SegmentError(f"{slide_path}: class_names is empty")
    colors = (
        [tuple(int(v) for v in c[:3]) for c in class_colors]
        if class_colors is not None
        else default_colors(len(names))
    )
    if len(colors) != len(names):
        raise SegmentError(f"{slide_path}: {len(names)} class names but {len(colors)} colours")
    if len(names) + 1 > 255:
        raise SegmentError(f"{slide_path}: at most 254 classes fit a uint8 mask, got {len(names)}")
    return names, colors  # type: ignore[return-value]


def output_paths(out_dir: Path, stem: str, geojson_gzip: bool = False) -> dict[str, Path]:
    """Where a slide's mask, GeoJSON and overlay go (``.geojson.gz`` when compressed)."""
    paths = {k: out_dir / f"{stem}{suf}" for k, suf in OUTPUT_SUFFIXES.items()}
    if geojson_gzip:
        paths["geojson"] = paths["geojson"].with_name(paths["geojson"].name + ".gz")
    return paths


def geojson_factor(shape: tuple[int, int], geojson_max_px: int, tiff_tile: int) -> int:
    """Downsampling of the mask that GeoJSON and the overlay are made from (≤ ``geojson_max_px`` a side).

    Powers of two dividing the TIFF tile, so every band the writer asks for starts on a block.
    """
    f = 1
    while max(shape) / f > geojson_max_px and tiff_tile % (f * 2) == 0:
        f *= 2
    return f


def write_mask(
    path: Path,
    canvas: Canvas,
    tissue: TissueResult | None,
    r: float,
    out_mpp: float,
    class_names: list[str],
    colors: list[tuple[int, ...]],
    *,
    geo_factor: int,
    tiff_tile: int,
    pyramid_min_size: int,
    maxworkers: int,
) -> tuple[MaskBands, int]:
    """The label pyramid, argmax of the canvas (outside ``tissue`` = background); returns the bands
    (class counts and the small mask for GeoJSON/overlay) and the number of pyramid levels."""
    bands = MaskBands(canvas, tissue, r, len(class_names) + 1, geo_factor)
    levels = write_pyramid(
        path,
        bands,
        canvas.shape,
        out_mpp,
        kind="labels",
        tile=tiff_tile,
        min_size=pyramid_min_size,
        compression="zlib",
        ome=True,
        class_names=class_names,
        class_colors=colors,  # type: ignore[arg-type]
        maxworkers=maxworkers,
    )
    return bands, len(levels)


def class_statistics(counts: np.ndarray, class_names: list[str], out_mpp: float) -> dict[str, Any]:
    """Per-class areas (µm²) and pixel counts, and the segmented (non-background) area."""
    px_um2 = out_mpp * out_mpp
    tissue_px = int(counts[1:].sum())
    return {
        "class_areas_um2": {name: float(counts[k] * px_um2) for k, name in enumerate(class_names, start=1)},
        "class_pixels": {name: int(counts[k]) for k, name in enumerate(class_names, start=1)},
        "segmented_area_um2": float(tissue_px * px_um2),
    }


def write_class_geojson(
    path: Path,
    small: np.ndarray,
    scale: float,
    counts: np.ndarray,
    class_names: list[str],
    colors: list[tuple[int, ...]],
    areas: Mapping[str, float],
    stem: str,
) -> None:
    """One QuPath detection per class, vectorised from ``small`` (``scale`` level-0 pixels per pixel),
    with its area and its fraction of the segmented tissue as measurements."""
    tissue_px = int(counts[1:].sum())
    geoms = mask_to_geometries(small, labels=list(range(1, len(class_names) + 1)), scale=scale)
    anns = [
        Annotation(
            name=class_names[k - 1],
            color=colors[k - 1],  # type: ignore[arg-type]
            geometry=g,
            measurements={
                "Area µm^2": areas[class_names[k - 1]],
                "Fraction of tissue": float(counts[k] / tissue_px) if tissue_px else 0.0,
            },
        )
        for k, g in sorted(geoms.items())
    ]
    write_annotations(path, anns, id_seed=f"{stem}/classes")


def stitch_and_write(
    slide_path: str | Path,
    tile_results: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]] | None = None,
    output_mpp: float | None = None,
    *,
    mpp_override: float | None = None,
    tissue: TissueResult | None = None,
    restrict_to_tissue: bool = True,
    all_tissue: bool = False,
    tissue_params: TissueParams | None = None,
    blend: str = "gaussian",
    chunk: int = 1024,
    canvas_dtype: str = "float32",
    max_open_mb: float = 256.0,
    scratch_dir: str | Path | None = None,
    tiff_tile: int = 256,
    pyramid_min_size: int = 512,
    geojson_max_px: int = 4096,
    geojson_gzip: bool = False,
    thumbnail_px: int = 1600,
    write_geojson: bool = True,
    write_overlay_png: bool = True,
    write_overlay_tiff: bool = True,
    overlay_max_px: int = 4096,
    maxworkers: int = 1,
) -> dict[str, Any]:
    """Blend tile maps into a canvas at ``output_mpp`` and write mask pyramid, GeoJSON and overlay.

    ``tile_results``: single tiles or batches as produced by :class:`SegmentPredictor` (``x``, ``y``,
    ``size0`` in level-0 pixels and ``logits``/``probs`` ``[B,]C,h,w``, C = len(class_names) + 1), in any
    order; they are consumed once. ``output_mpp`` defaults to the slide's own (level 0). With
    ``restrict_to_tissue`` (default) pixels more than one tissue-mask pixel (8 µm by default) outside the
    tissue mask are background: the plan's ``tissue`` is reused when given, else detected again.
    ``all_tissue`` (whole patch images) takes the argmax over the tissue classes only. The canvas lives
    in ``scratch_dir``, by default ``out_dir``'s temp folder (removed again when empty). Returns
    statistics for the cohort table: per-class areas (µm²), tissue megapixels, tile count and timings
    split into wait (upstream inference, when the iterable is lazy), stitch and write.
    """
    t_start = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names, colors = class_table(slide_path, class_names, class_colors)
    with open_any(slide_path, mpp_override) as slide:
        slide_mpp = float(slide.mpp)  # type: ignore[arg-type]
        w0, h0 = slide.dimensions
        if restrict_to_tissue and tissue is None:
            tissue = detect_tissue(slide, tissue_params or TissueParams())
        thumb = slide.thumbnail(thumbnail_px) if write_overlay_png else None
        big_thumb = slide.thumbnail(min(overlay_max_px, max(w0, h0))) if write_overlay_tiff else None
    out_mpp = float(output_mpp or slide_mpp)
    r = out_mpp / slide_mpp
    H, W = max(1, math.ceil(h0 / r - 1e-9)), max(1, math.ceil(w0 / r - 1e-9))
    stem = slide_stem(slide_path)
    paths = output_paths(out_dir, stem, geojson_gzip)
    stats: dict[str, Any] = {
        "slide": str(slide_path),
        "slide_id": stem,
        "output_mpp": out_mpp,
        "slide_mpp": slide_mpp,
    }

    # The canvas' chunk files go in the atomic writers' temp folder, not among the outputs: a killed
    # run's leftover is hidden from readers, swept with the temp files after a pipeline stage, and
    # dropped here by the next write into this folder.
    scratch = Path(scratch_dir) if scratch_dir else out_dir / TEMP_DIR
    drop_stale_canvases(scratch)
    canvas = Canvas(
        scratch,
        (H, W),
        len(class_names) + 1,
        chunk=chunk,
        blend=blend,
        dtype=canvas_dtype,
        max_open_mb=max_open_mb,
        all_tissue=all_tissue,
    )  # type: ignore[arg-type]
    try:
        filled = fill_canvas(canvas, tile_results, r, slide_path, class_names)
        t2 = time.perf_counter()
        geo_factor = geojson_factor((H, W), geojson_max_px, tiff_tile)
        bands, n_levels = write_mask(
            paths["mask"], canvas, tissue if restrict_to_tissue else None, r, out_mpp, class_names, colors,
            geo_factor=geo_factor, tiff_tile=tiff_tile, pyramid_min_size=pyramid_min_size,
            maxworkers=maxworkers,
        )  # fmt: skip
        t_mask = time.perf_counter() - t2
    finally:
        chunks = canvas.chunks_on_disk
        canvas.close()
        if not scratch_dir:
            with contextlib.suppress(OSError):  # still holds another write's temp file, or gone
                scratch.rmdir()

    t3 = time.perf_counter()
    counts = bands.counts[: len(class_names) + 1]
    per_class = class_statistics(counts, class_names, out_mpp)
    if write_geojson:
        write_class_geojson(
            paths["geojson"], bands.small, geo_factor * r, counts, class_names, colors,
            per_class["class_areas_um2"], stem,
        )  # fmt: skip
    t_geo = time.perf_counter() - t3
    t4 = time.perf_counter()
    if write_overlay_png and thumb is not None:
        write_overlay(paths["overlay"], thumb, bands.small, class_names, colors)
    if write_overlay_tiff and big_thumb is not None:
        thumb_mpp = slide_mpp * w0 / big_thumb.shape[1]
        write_overlay_pyramid(paths["overlay_tiff"], big_thumb, bands.small, colors, thumb_mpp)
    t_overlay = time.perf_counter() - t4

    stats.update(
        {
            "n_tiles": filled.n_tiles,
            "shape": (H, W),
            "levels": n_levels,
            **per_class,
            "tissue_area_um2": float(tissue.area_um2)
            if tissue is not None
            else float(w0 * h0 * slide_mpp**2),
            "canvas_chunks": chunks,
            "geojson_downsample": geo_factor,
            "paths": {
                k: str(p)
                for k, p in paths.items()
                if (k != "geojson" or write_geojson)
                and (k != "overlay" or write_overlay_png)
                and (k != "overlay_tiff" or write_overlay_tiff)
            },
            "wait_s": filled.wait_s,
            "stitch_s": filled.stitch_s,
            "mask_write_s": t_mask,
            "geojson_s": t_geo,
            "overlay_s": t_overlay,
            "write_s": t_mask + t_geo + t_overlay,
            "total_s": time.perf_counter() - t_start,
        }
    )
    stats["tissue_mpix"] = stats["tissue_area_um2"] / slide_mpp**2 / 1e6
    return stats
