"""Step (a) of segmenting a slide: which tiles to predict, on an mpp-first grid with overlap.

Unlike the tile stage's grid, the last row/column is shifted to end at the slide border (and a slide
smaller than one tile gets one overhanging tile), so every tissue pixel is covered: dropping border tiles
would leave unsegmented strips. Plain PNG/JPEG images open here as one-level slides, so GlaS-sized
images go through the same path as WSIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pbip_engine.engine.inference import SEGMENT_OVERLAP
from pbip_engine.engine.io.decode import ImageDecodeError, decode_checked
from pbip_engine.engine.wsi.grid import grid_positions
from pbip_engine.engine.wsi.slide_ids import slide_id
from pbip_engine.engine.wsi.slides import (
    MAX_PIXELS_PER_BYTE,
    Slide,
    SlideError,
    _Backend,
    check_declared_size,
    check_slide_file,
    open_slide,
)
from pbip_engine.engine.wsi.tiling import TileSpec, read_level_for, tissue_fractions
from pbip_engine.engine.wsi.tissue import TissueParams, TissueResult, detect_tissue

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
MAX_IMAGE_PIXELS = 178_956_970  # plain images are held whole in memory (PIL's own bomb limit: 540 MB RGB)
TILE_KEYS = ("x", "y", "size0", "level", "read_size", "tissue_fraction")


class SegmentError(ValueError):
    """Bad arguments or tile results for a slide; the message names the slide."""


# ------------------------------------------------------------------------------------ plain images


class _ArrayBackend(_Backend):
    """One-level "slide" held in memory (GlaS-sized PNG/JPEG tiles, not whole slides)."""

    name = "image"

    def __init__(self, rgb: np.ndarray) -> None:
        self._rgb = rgb
        self.level_dimensions = [(int(rgb.shape[1]), int(rgb.shape[0]))]
        self.level_downsamples = [1.0]

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        (x, y), (w, h) = location, size
        if x < 0 or y < 0 or x + w > self._rgb.shape[1] or y + h > self._rgb.shape[0]:
            raise ValueError(
                f"region x={x} y={y} {w}x{h} leaves the {self._rgb.shape[1]}x{self._rgb.shape[0]} image"
            )
        return self._rgb[y : y + h, x : x + w]

    def close(self) -> None:
        self._rgb = np.zeros((1, 1, 3), np.uint8)


def image_dimensions(path: Path) -> tuple[int, int]:
    """(width, height) from the image header alone (PIL reads no pixels until asked)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except Image.DecompressionBombError as e:
        raise SlideError(path, "implausible_size", f"{e} (plain images are decoded whole)") from None
    except Exception as e:  # PIL's errors for broken headers vary (OSError, SyntaxError, ValueError...)
        raise SlideError(path, "unreadable", f"not a readable image ({type(e).__name__}: {e})") from None


def open_image_slide(path: str | Path, mpp: float, max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE) -> Slide:
    """A PNG/JPEG opened as a one-level :class:`Slide` (same interface), at the caller's µm/px.

    The whole image is decoded into memory, so its declared size is checked from the header first: a
    631-byte JPEG declaring 30000² pixels would otherwise allocate 2.7 GB in ``cv2.imread``.
    """
    path = Path(path)
    check_slide_file(path)
    if not (mpp and mpp > 0 and math.isfinite(mpp)):
        raise SlideError(path, "no_mpp", f"plain images carry no µm/px: pass mpp_override (got {mpp!r})")
    w, h = image_dimensions(path)
    check_declared_size(path, (w, h), max_pixels_per_byte)
    if w * h > MAX_IMAGE_PIXELS:
        raise SlideError(
            path,
            "implausible_size",
            f"{w}x{h} plain image: images are decoded whole (at most {MAX_IMAGE_PIXELS} pixels); "
            "convert a larger one to a tiled pyramidal TIFF",
        )
    try:  # a truncated JPEG decodes "successfully", grey from the cut on: only its warning tells
        bgr = decode_checked(lambda: cv2.imread(str(path), cv2.IMREAD_COLOR))
    except ImageDecodeError as e:
        raise SlideError(path, "unreadable", str(e)) from None
    rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    backend = _ArrayBackend(rgb)
    return Slide(
        path=path,
        backend="image",
        level_dimensions=list(backend.level_dimensions),
        level_downsamples=[1.0],
        mpp=float(mpp),
        mpp_source="override",
        _reader=backend,
    )


def open_any(
    path: str | Path, mpp_override: float | None = None, max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE
) -> Slide:
    """:func:`open_slide` for WSIs, :func:`open_image_slide` for PNG/JPEG (which need ``mpp_override``)."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return open_image_slide(path, mpp_override, max_pixels_per_byte)  # type: ignore[arg-type]
    return open_slide(path, mpp_override=mpp_override, max_pixels_per_byte=max_pixels_per_byte)


def slide_stem(path: str | Path) -> str:
    """Output name stem: the slide id (:func:`~pbip_engine.engine.wsi.slide_ids.slide_id`, one rule)."""
    return slide_id(path)


@dataclass
class SegmentPlan:
    """Tiles of one slide at the model's resolution, plus what stitching needs to know about the slide."""

    slide_path: str
    slide_mpp: float
    dimensions: tuple[int, int]  # level-0 (width, height)
    model_mpp: float
    tile_px: int
    overlap: float
    tiles: list[TileSpec]
    tissue: TissueResult | None = field(default=None, repr=False)
    tissue_area_um2: float = 0.0

    @property
    def tissue_mpix(self) -> float:
        """Tissue area in level-0 megapixels (the throughput unit of the bench)."""
        return self.tissue_area_um2 / (self.slide_mpp**2) / 1e6

    def tile_table(self) -> dict[str, np.ndarray]:
        """Columns x, y, size0, level, read_size, tissue_fraction (+ slide_path): a Ray Data block."""
        cols: dict[str, np.ndarray] = {
            k: np.array(
                [getattr(t, k) for t in self.tiles], np.float32 if k == "tissue_fraction" else np.int64
            )
            for k in TILE_KEYS
        }
        cols["slide_path"] = np.array([self.slide_path] * len(self.tiles), dtype=object)
        return cols


def plan(
    slide_path: str | Path,
    model_mpp: float,
    tile_px: int = 512,
    overlap: float = SEGMENT_OVERLAP,
    tissue_params: TissueParams | None = None,
    *,
    min_tissue: float = 0.0,
    mpp_override: float | None = None,
    use_tissue: bool = True,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE,
) -> SegmentPlan:
    """Overlapping tiles of ``tile_px`` pixels at ``model_mpp`` that touch tissue (fraction > ``min_tissue``).

    ``use_tissue=False`` tiles the whole image (plain images that are all tissue, e.g. GlaS). Raises
    :class:`SlideError` (reasons ``no_mpp``, ``no_tissue``, ...) for slides that cannot be segmented.
    """
    if not 0.0 <= overlap < 1.0:
        raise SegmentError(f"{slide_path}: overlap must be in [0, 1), got {overlap}")
    if tile_px < 16:
        raise SegmentError(f"{slide_path}: tile_px must be >= 16, got {tile_px}")
    with open_any(slide_path, mpp_override, max_pixels_per_byte) as slide:
        level, ds = read_level_for(slide, model_mpp)
        size0 = max(1, round(tile_px * ds))
        read_size = max(1, round(size0 / slide.level_downsamples[level]))
        w0, h0 = slide.dimensions
        stride0 = max(1.0, size0 * (1.0 - overlap))
        xs = grid_positions(w0, size0, stride0, edge="overhang")
        ys = grid_positions(h0, size0, stride0, edge="overhang")
        tissue: TissueResult | None = None
        if use_tissue:
            tissue = detect_tissue(slide, tissue_params or TissueParams())
            frac = tissue_fractions(tissue.mask, tissue.downsample, xs, ys, size0)
            area = tissue.area_um2
        else:
            frac = np.ones((len(ys), len(xs)))
            area = w0 * h0 * float(slide.mpp) ** 2
        keep = (frac > min_tissue) & (frac > 0)
        iy, ix = np.nonzero(keep)
        tiles = [
            TileSpec(int(xs[i]), int(ys[j]), size0, level, read_size, float(frac[j, i]))
            for j, i in zip(iy.tolist(), ix.tolist(), strict=True)
        ]
        return SegmentPlan(
            slide_path=str(slide_path),
            slide_mpp=float(slide.mpp),  # type: ignore[arg-type]
            dimensions=(w0, h0),
            model_mpp=float(model_mpp),
            tile_px=int(tile_px),
            overlap=float(overlap),
            tiles=tiles,
            tissue=tissue,
            tissue_area_um2=float(area),
        )
