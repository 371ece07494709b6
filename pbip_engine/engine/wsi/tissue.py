"""Tissue detection on a low-resolution rendering of the slide (default 8 µm/px).

HSV saturation separates stained tissue from glass better than grey level (CLAM, WSInfer, PathML all
use it). Otsu picks the threshold per slide, with a floor so a blank slide yields *no* tissue instead
of Otsu splitting noise in two. Morphology and the size filters are in physical units (µm²), so the
same parameters behave the same on a 20x and a 40x scan. Dark pixels (black ink, pen, folds) are
excluded because they are saturated enough to pass the threshold but are never tissue to tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.io.atomic import atomic_write_bytes
from pbip_engine.engine.wsi.slides import Slide, SlideError

QC_CONTOUR_RGB = (0, 200, 0)
# The detection rendering and its masks are held in memory: at most this many pixels (about 0.5 GB at
# the peak of the morphology). A 75 x 50 mm slide fits at ~11 µm/px; a larger (or larger-declared)
# slide is rendered coarser instead of sizing arrays from its declared dimensions.
MAX_DETECTION_PIXELS = 32 * 1024 * 1024


@dataclass
class TissueParams:
    """Detection knobs; areas are physical so they do not depend on the scan magnification."""

    target_mpp: float = 8.0  # resolution of the detection mask
    blur: int = 7  # median blur kernel (mask pixels, odd)
    sat_threshold: float | None = None  # fixed saturation threshold in [0, 1]; None = Otsu
    min_saturation: float = 0.05  # floor under Otsu so blank slides give no tissue
    close_radius: int = 2  # closing then opening radius, mask pixels
    min_area_um2: float = 20000.0  # drop tissue objects smaller than this
    min_hole_um2: float = 10000.0  # fill holes smaller than this
    exclude_dark: bool = True  # drop black / pen pixels (HSV value below dark_value)
    dark_value: float = 0.2  # HSV V threshold in [0, 1] for exclude_dark


@dataclass
class TissueResult:
    mask: np.ndarray  # bool (h, w) at the detection resolution
    downsample: float  # level-0 pixels per mask pixel
    polygons: Any  # shapely Polygon/MultiPolygon in level-0 pixels
    thumbnail: np.ndarray  # RGB uint8 (h, w, 3), same grid as mask
    area_um2: float
    threshold: float = float("nan")  # saturation threshold used, in [0, 1] (nan for an ROI)
    mask_mpp: float = float("nan")  # µm per mask pixel


def detection_downsample(slide: Slide, target_mpp: float) -> float:
    """Level-0 pixels per mask pixel for ``target_mpp`` (≥ 1: never render finer than level 0), made
    coarser where the rendering would exceed MAX_DETECTION_PIXELS."""
    if slide.mpp is None:
        raise SlideError(slide.path, "no_mpp", "tissue detection needs the slide's µm/px")
    w0, h0 = slide.dimensions
    budget = math.sqrt(w0 * h0 / MAX_DETECTION_PIXELS)
    return max(1.0, target_mpp / slide.mpp, budget)


def detect_tissue(slide: Slide, params: TissueParams | None = None) -> TissueResult:
    """Tissue mask, level-0 polygons and a thumbnail; ``SlideError(reason="no_tissue")`` when empty."""
    params = params or TissueParams()
    ds = detection_downsample(slide, params.target_mpp)
    rgb = slide.read_scaled(ds)
    mask, thr = tissue_mask_from_rgb(rgb, mpp=slide.mpp * ds, params=params)  # type: ignore[operator]
    return _result(slide, rgb, mask, ds, thr, params)


def tissue_mask_from_rgb(rgb: np.ndarray, mpp: float, params: TissueParams) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB image whose pixels are ``mpp`` µm wide, and the threshold used."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = hsv[:, :, 1]
    k = max(1, int(params.blur) | 1)
    if k > 1:
        sat = cv2.medianBlur(sat, k)
    if params.sat_threshold is not None:
        thr = float(params.sat_threshold) * 255.0
    else:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = max(float(otsu), params.min_saturation * 255.0)
    mask = sat > thr
    if params.exclude_dark:
        val = hsv[:, :, 2]
        if k > 1:
            val = cv2.medianBlur(val, k)
        mask &= val >= params.dark_value * 255.0
    r = int(params.close_radius)
    if r > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        m8 = mask.astype(np.uint8)
        m8 = cv2.morphologyEx(m8, cv2.MORPH_CLOSE, kernel)
        m8 = cv2.morphologyEx(m8, cv2.MORPH_OPEN, kernel)
        mask = m8.astype(bool)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, params.min_area_um2 / px_area)
    mask = fill_small_holes(mask, params.min_hole_um2 / px_area)
    return mask, thr / 255.0


def remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask.copy()
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the image border."""
    if max_px <= 0:
        return mask.copy()
    inv = (~mask).astype(np.uint8)
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    x, y, w, h, area = (stats[:, i] for i in range(5))
    H, W = mask.shape
    border = (x == 0) | (y == 0) | (x + w == W) | (y + h == H)
    fill = (area < max_px) & ~border
    fill[0] = False
    return mask | fill[labels]


def tissue_from_geometry(slide: Slide, geometry: Any, params: TissueParams | None = None) -> TissueResult:
    """A :class:`TissueResult` from level-0 polygons (an edited QC GeoJSON fed back as the ROI)."""
    params = params or TissueParams()
    ds = detection_downsample(slide, params.target_mpp)
    rgb = slide.read_scaled(ds)
    h, w = rgb.shape[:2]
    mask = rasterize(geometry, (h, w), ds)
    return _result(slide, rgb, mask, ds, float("nan"), params, geometry=geometry)


def rasterize(geometry: Any, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Boolean mask of level-0 ``geometry`` on a grid of ``downsample`` level-0 px per pixel.

    A pixel is set when its centre, ``((i + 0.5) * downsample, (j + 0.5) * downsample)``, lies inside
    (exact point-in-polygon on the geometry's bounding box, so holes and multipolygons are honoured).
    """
    import shapely

    h, w = shape
    mask = np.zeros((h, w), bool)
    if geometry is None or geometry.is_empty:
        return mask
    minx, miny, maxx, maxy = geometry.bounds
    i0, i1 = max(0, math.floor(minx / downsample - 0.5)), min(w, math.ceil(maxx / downsample + 0.5))
    j0, j1 = max(0, math.floor(miny / downsample - 0.5)), min(h, math.ceil(maxy / downsample + 0.5))
    if i0 >= i1 or j0 >= j1:
        return mask
    shapely.prepare(geometry)
    xx = (np.arange(i0, i1) + 0.5) * downsample
    yy = (np.arange(j0, j1) + 0.5) * downsample
    gx, gy = np.meshgrid(xx, yy)
    mask[j0:j1, i0:i1] = shapely.contains_xy(geometry, gx, gy)
    return mask


def _result(
    slide: Slide,
    rgb: np.ndarray,
    mask: np.ndarray,
    ds: float,
    thr: float,
    params: TissueParams,
    geometry: Any = None,
) -> TissueResult:
    if not mask.any():
        how = "ROI polygons" if geometry is not None else f"saturation threshold {thr:.3f}"
        raise SlideError(
            slide.path,
            "no_tissue",
            f"no tissue found at {params.target_mpp} µm/px ({how}, min object {params.min_area_um2:g} µm²)",
        )
    mask_mpp = float(slide.mpp) * ds  # type: ignore[arg-type]
    if geometry is None:
        from pbip_engine.engine.annotations.geojson import mask_to_geometries

        geoms = mask_to_geometries(mask.astype(np.uint8), labels=[1], scale=ds, offset=(0, 0))
        geometry = geoms.get(1)
    return TissueResult(
        mask=mask,
        downsample=ds,
        polygons=geometry,
        thumbnail=rgb,
        area_um2=float(mask.sum()) * mask_mpp * mask_mpp,
        threshold=thr,
        mask_mpp=mask_mpp,
    )


def draw_tissue_qc(result: TissueResult, max_size: int = 2048) -> np.ndarray:
    """RGB thumbnail (longer side ≤ ``max_size``) with the tissue contour and holes drawn."""
    img, mask = result.thumbnail, result.mask.astype(np.uint8)
    h, w = mask.shape
    scale = min(1.0, max_size / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    img = np.ascontiguousarray(img.copy())
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(img.shape[:2]) / 500))
    cv2.drawContours(img, contours, -1, QC_CONTOUR_RGB, thickness)
    return img


def tissue_qc_png(result: TissueResult, path: str | Path, max_size: int = 2048) -> None:
    """Write the QC thumbnail with the tissue contour as PNG (longer side ≤ ``max_size``), atomically."""
    path = Path(path)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(draw_tissue_qc(result, max_size), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())
