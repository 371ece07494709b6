"""Segment one slide: plan tiles, predict them in batches, stitch, and write QuPath-ready outputs.

Three separable parts, so the lead's Ray job can put each where it belongs (a task for the plan, a
Ray Data actor pool for :class:`TileReader` + :class:`SegmentPredictor`, one task per slide for
:func:`stitch_and_write`) while :func:`segment_local` chains them in one process (tests, the bench,
``pbip-engine segment`` without a cluster):

(a) :func:`plan` - tissue tiles on an mpp-first grid with overlap (default 25 %); unlike the tile
    stage's grid, the last row/column is shifted to end at the slide border, so every tissue pixel is
    covered (dropping border tiles would leave unsegmented strips).
(b) :class:`SegmentPredictor` - ``{"image": uint8 B,h,w,3, x, y, size0, ...}`` ->
    ``{"logits" (or "probs"): float16 B,C,h',w', x, y, size0, ...}``.
(c) :func:`stitch_and_write` - blends the tiles into a :class:`~pbip_engine.engine.inference.stitch.Canvas` at
    ``output_mpp`` and writes, each atomically:

    * ``<slide>.mask.ome.tif`` - uint8 label pyramid (0 = background, k = class k), deflate, OME-XML
      with the physical pixel size and the class table; mask pixel (i, j) covers level-0 pixels
      [j r, (j+1) r) x [i r, (i+1) r) with r = output_mpp / slide_mpp.
    * ``<slide>.classes.geojson`` - one valid (Multi)Polygon per class in level-0 pixels,
      ``classification {name, color}``, area in µm², vectorised from a mode-downsampled mask.
    * ``<slide>.overlay.png`` - thumbnail with the classes blended in.

Memory is bounded by the tiles in flight, the canvas' open-chunk cache and one band of output rows;
no full-resolution array exists at any point.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.annotations.geojson import Annotation, mask_to_geometries, write_annotations
from pbip_engine.engine.inference.stitch import Canvas
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD
from pbip_engine.engine.outputs.overlay import default_colors, write_overlay
from pbip_engine.engine.outputs.tiff_writer import write_pyramid
from pbip_engine.engine.wsi.grid import grid_positions
from pbip_engine.engine.wsi.slides import Slide, SlideError, _Backend, open_slide
from pbip_engine.engine.wsi.tiling import TileSpec, iter_tiles, read_level_for, tissue_fractions
from pbip_engine.engine.wsi.tissue import TissueParams, TissueResult, detect_tissue

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
TILE_KEYS = ("x", "y", "size0", "level", "read_size", "tissue_fraction")
OUTPUT_SUFFIXES = {"mask": ".mask.ome.tif", "geojson": ".classes.geojson", "overlay": ".overlay.png"}


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


def open_image_slide(path: str | Path, mpp: float) -> Slide:
    """A PNG/JPEG opened as a one-level :class:`Slide` (same interface), at the caller's µm/px."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(path, "missing", "file does not exist")
    if not (mpp and mpp > 0 and math.isfinite(mpp)):
        raise SlideError(path, "no_mpp", f"plain images carry no µm/px: pass mpp_override (got {mpp!r})")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SlideError(path, "unreadable", "OpenCV could not decode the image")
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


def open_any(path: str | Path, mpp_override: float | None = None) -> Slide:
    """:func:`open_slide` for WSIs, :func:`open_image_slide` for PNG/JPEG (which need ``mpp_override``)."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return open_image_slide(path, mpp_override)  # type: ignore[arg-type]
    return open_slide(path, mpp_override=mpp_override)


def slide_stem(path: str | Path) -> str:
    """Output name stem: file name without its extension (``a.svs`` -> ``a``, ``b.ome.tif`` -> ``b``)."""
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


# ------------------------------------------------------------------------------------------- (a) plan


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
    overlap: float = 0.25,
    tissue_params: TissueParams | None = None,
    *,
    min_tissue: float = 0.0,
    mpp_override: float | None = None,
    use_tissue: bool = True,
) -> SegmentPlan:
    """Overlapping tiles of ``tile_px`` pixels at ``model_mpp`` that touch tissue (fraction > ``min_tissue``).

    ``use_tissue=False`` tiles the whole image (plain images that are all tissue, e.g. GlaS). Raises
    :class:`SlideError` (reasons ``no_mpp``, ``no_tissue``, ...) for slides that cannot be segmented.
    """
    if not 0.0 <= overlap < 1.0:
        raise SegmentError(f"{slide_path}: overlap must be in [0, 1), got {overlap}")
    if tile_px < 16:
        raise SegmentError(f"{slide_path}: tile_px must be >= 16, got {tile_px}")
    with open_any(slide_path, mpp_override) as slide:
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


# -------------------------------------------------------------------------------------- tile reading


def _read_padded(slide: Slide, t: TileSpec, tile_px: int) -> np.ndarray:
    """A tile that hangs over the slide border: read the inside part, pad with white, resize."""
    w0, h0 = slide.dimensions
    lds = slide.level_downsamples[t.level]
    lw, lh = slide.level_dimensions[t.level]
    rw = max(1, min(t.read_size, lw - math.floor(t.x / lds), math.ceil((w0 - t.x) / lds)))
    rh = max(1, min(t.read_size, lh - math.floor(t.y / lds), math.ceil((h0 - t.y) / lds)))
    region = slide.read_region((t.x, t.y), t.level, (rw, rh))
    canvas = np.full((t.read_size, t.read_size, 3), 255, np.uint8)
    canvas[:rh, :rw] = region
    if t.read_size != tile_px:
        interp = cv2.INTER_AREA if t.read_size >= tile_px else cv2.INTER_LINEAR
        canvas = cv2.resize(canvas, (tile_px, tile_px), interpolation=interp)
    return canvas


def iter_tile_pixels(
    slide: Slide, tiles: Sequence[TileSpec], tile_px: int
) -> Iterator[tuple[TileSpec, np.ndarray]]:
    """(tile, RGB uint8 tile_px x tile_px) in order; inside tiles are read in row runs (tiling.iter_tiles)."""
    w0, h0 = slide.dimensions
    inside = [t.x + t.size0 <= w0 and t.y + t.size0 <= h0 for t in tiles]
    if all(inside):
        yield from iter_tiles(slide, list(tiles), tile_px)
        return
    for t, ok in zip(tiles, inside, strict=True):
        yield t, (iter_tiles(slide, [t], tile_px).__next__()[1] if ok else _read_padded(slide, t, tile_px))


class TileReader:
    """Ray Data ``map_batches`` callable: tile-table rows -> the same rows plus ``"image"``.

    Keeps up to ``max_open`` slides open per worker (handles are never pickled).
    """

    def __init__(
        self, tile_px: int, mpp_overrides: Mapping[str, float] | None = None, max_open: int = 4
    ) -> None:
        self.tile_px = int(tile_px)
        self.mpp_overrides = dict(mpp_overrides or {})
        self.max_open = max_open
        self._slides: OrderedDict[str, Slide] = OrderedDict()

    def _slide(self, path: str) -> Slide:
        s = self._slides.get(path)
        if s is None:
            s = open_any(path, self.mpp_overrides.get(path, self.mpp_overrides.get(Path(path).name)))
            self._slides[path] = s
            while len(self._slides) > self.max_open:
                self._slides.popitem(last=False)[1].close()
        self._slides.move_to_end(path)
        return s

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["x"])
        images = np.empty((n, self.tile_px, self.tile_px, 3), np.uint8)
        paths = batch["slide_path"]
        i = 0
        while i < n:  # consecutive rows of one slide are read together (row runs)
            j = i
            while j < n and paths[j] == paths[i]:
                j += 1
            slide = self._slide(str(paths[i]))
            tiles = [TileSpec(*(int(batch[k][r]) for k in TILE_KEYS[:5]), 0.0) for r in range(i, j)]
            for r, (_, px) in enumerate(iter_tile_pixels(slide, tiles, self.tile_px), start=i):
                images[r] = px
            i = j
        return {**{k: np.asarray(v) for k, v in batch.items()}, "image": images}


# -------------------------------------------------------------------------------------- (b) predict


class SegmentPredictor:
    """Callable tile-batch predictor; build once per actor/process (the model is loaded in ``__init__``).

    ``__call__({"image": uint8 B,h,w,3, ...}) -> {"logits": float16 B,C,h',w', ...}`` with every other
    key passed through (tile coordinates, slide path). ``output="probs"`` returns softmax probabilities
    under the key ``"probs"`` instead. ``output_scale`` < 1 downsamples the maps on the device
    (h' = round(h * output_scale)) so less data leaves the GPU when the output mpp is coarser than the
    model's. Normalisation uses the model's own ``mean``/``std``.
    """

    def __init__(
        self,
        model: Any,
        device: str = "auto",
        amp: bool = True,
        *,
        output: str = "logits",
        output_scale: float = 1.0,
        micro_batch: int | None = None,
        channels_last: bool = True,
    ) -> None:
        import torch

        if output not in ("logits", "probs"):
            raise SegmentError(f"SegmentPredictor output must be 'logits' or 'probs', got {output!r}")
        if not 0 < output_scale <= 1:
            raise SegmentError(f"output_scale must be in (0, 1], got {output_scale}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if isinstance(model, (str, Path)):
            from pbip_engine.engine.training.stage2 import load_segmenter

            model = load_segmenter(model, self.device)
        self.model = model.to(self.device).eval()
        cfg = getattr(model, "config", {})
        self.mean = tuple(cfg.get("mean", getattr(model, "mean", IMAGENET_MEAN)))
        self.std = tuple(cfg.get("std", getattr(model, "std", IMAGENET_STD)))
        self.n_classes = cfg.get("n_classes")
        self.amp = bool(amp) and self.device.type == "cuda"
        self.output = output
        self.output_scale = float(output_scale)
        self.micro_batch = micro_batch
        if channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=self.device).view(1, 3, 1, 1)
        self._shift = torch.tensor(
            [-m / s for m, s in zip(self.mean, self.std, strict=True)], device=self.device
        ).view(1, 3, 1, 1)

    def _autocast(self) -> Any:
        """bf16 autocast on CUDA (fp16 where bf16 is missing), nothing elsewhere: train_classnet's policy."""
        import contextlib

        import torch

        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``B,h,w,3`` -> float16 ``B,C,h',w'`` (logits or probabilities)."""
        import torch
        import torch.nn.functional as F

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise SegmentError(
                f"SegmentPredictor needs uint8 B,h,w,3 images, got {images.shape} {images.dtype}"
            )
        outs = []
        step = self.micro_batch or len(images) or 1
        with torch.inference_mode():
            for i in range(0, len(images), step):
                x = torch.from_numpy(images[i : i + step]).to(self.device, non_blocking=True)
                x = x.permute(0, 3, 1, 2).float() * self._scale + self._shift
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    y = self.model(x)
                y = y.float()
                if self.output_scale < 1.0:
                    size = [max(1, round(s * self.output_scale)) for s in y.shape[-2:]]
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
                if self.output == "probs":
                    y = y.softmax(1)
                outs.append(y.half().cpu().numpy())
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, self.n_classes or 1, 1, 1), np.float16)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if "image" not in batch:
            raise SegmentError(f"SegmentPredictor batch needs an 'image' column, got {sorted(batch)}")
        out = {k: v for k, v in batch.items() if k != "image"}
        out[self.output] = self.predict(batch["image"])
        return out


# -------------------------------------------------------------------------- (c) stitch and write


def _resample_taps(
    n_out: int, out_start: float, out_step: float, n_src: int, src_start: float, src_step: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse linear-interpolation weights (antialiased when shrinking) between two 1-D pixel grids.

    Grid pixel k covers [start + k step, start + (k+1) step) in level-0 units. Each output pixel samples
    the source at its centre with a triangle kernel max(1, out_step/src_step) source pixels wide,
    clamped at the source border (edge replication). Returns (index, weight), both ``n_out x taps``,
    weights summing to 1 per row. Sparse taps instead of a dense matrix product: small GEMMs go through
    a multi-threaded BLAS that crawls on a busy machine.
    """
    centres = (out_start + (np.arange(n_out) + 0.5) * out_step - src_start) / src_step - 0.5
    centres = np.clip(centres, 0.0, n_src - 1.0)
    k = max(1.0, out_step / src_step)
    first = np.floor(centres - k).astype(np.int64) + 1
    offsets = np.arange(int(np.ceil(2 * k)) + 1)
    idx = first[:, None] + offsets[None, :]
    wts = np.maximum(0.0, 1.0 - np.abs(idx - centres[:, None]) / k)
    wts[(idx < 0) | (idx >= n_src)] = 0.0
    wts /= wts.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_src - 1), wts.astype(np.float32)


def tile_to_output(x: int, y: int, size0: int, maps: np.ndarray, r: float) -> tuple[int, int, np.ndarray]:
    """Resample tile maps ``[C, h, w]`` covering level-0 [x, x+size0) onto the output grid of pitch ``r``.

    Returns (row, col, [C, ho, wo]) for the output pixels whose centres fall inside the tile. When the
    tile grid coincides with the output grid (same pitch, aligned), the maps are returned unchanged.
    """
    c, h, w = maps.shape
    sy, sx = size0 / h, size0 / w
    j0 = math.ceil(x / r - 0.5)
    j1 = math.ceil((x + size0) / r - 0.5)
    i0 = math.ceil(y / r - 0.5)
    i1 = math.ceil((y + size0) / r - 0.5)
    ho, wo = i1 - i0, j1 - j0
    if ho <= 0 or wo <= 0:
        return i0, j0, np.zeros((c, 0, 0), np.float32)
    aligned = (
        ho == h
        and wo == w
        and abs(sy - r) < 1e-9
        and abs(sx - r) < 1e-9
        and abs(x - j0 * r) < 1e-6
        and abs(y - i0 * r) < 1e-6
    )
    if aligned:
        return i0, j0, maps
    src = maps.astype(np.float32, copy=False)
    f = int(min(r / sx, r / sy) + 1e-9)
    if f >= 2 and h % f == 0 and w % f == 0:  # integer shrink first: exact f x f box average
        src = src.reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))
        h, w, sy, sx = h // f, w // f, sy * f, sx * f
    if max(r / sx, r / sy) <= 1.5:
        # Near 1:1 or upsampling: bilinear sampling at the output pixel centres (OpenCV, per channel).
        m = np.array(
            [[r / sx, 0.0, ((j0 + 0.5) * r - x) / sx - 0.5], [0.0, r / sy, ((i0 + 0.5) * r - y) / sy - 0.5]],
            np.float64,
        )
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        out = np.stack(
            [
                cv2.warpAffine(src[k], m, (wo, ho), flags=flags, borderMode=cv2.BORDER_REPLICATE)
                for k in range(c)
            ]
        )
        return i0, j0, out
    iy, wy = _resample_taps(ho, i0 * r, r, h, y, sy)
    ix, wx = _resample_taps(wo, j0 * r, r, w, x, sx)
    tmp = np.einsum("chwt,wt->chw", src[:, :, ix], wx)  # columns: [C, h, wo]
    out = np.einsum("chwt,ht->chw", tmp[:, iy].transpose(0, 1, 3, 2), wy)  # rows: [C, ho, wo]
    return i0, j0, np.ascontiguousarray(out)


def _iter_tile_results(
    tile_results: Iterable[Mapping[str, Any]], key: str | None
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(x, y, size0, maps [C,h,w]) from single tiles or batches (``maps`` B,C,h,w), logits or probs."""
    for item in tile_results:
        k = key or ("logits" if "logits" in item else "probs" if "probs" in item else None)
        if k is None or k not in item:
            raise SegmentError(f"tile result needs a 'logits' or 'probs' entry, got keys {sorted(item)}")
        maps = np.asarray(item[k])
        xs, ys, ss = (np.atleast_1d(np.asarray(item[c])) for c in ("x", "y", "size0"))
        if maps.ndim == 3:
            maps = maps[None]
        if maps.ndim != 4 or not (len(maps) == len(xs) == len(ys) == len(ss)):
            raise SegmentError(f"tile result '{k}' has shape {maps.shape} for {len(xs)} tile coordinates")
        for b in range(len(maps)):
            yield int(xs[b]), int(ys[b]), int(ss[b]), maps[b]


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


class _BandWriter:
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
    maxworkers: int = 1,
) -> dict[str, Any]:
    """Blend tile maps into a canvas at ``output_mpp`` and write mask pyramid, GeoJSON and overlay.

    ``tile_results``: single tiles or batches as produced by :class:`SegmentPredictor` (``x``, ``y``,
    ``size0`` in level-0 pixels and ``logits``/``probs`` ``[B,]C,h,w``, C = len(class_names) + 1), in any
    order; they are consumed once. ``output_mpp`` defaults to the slide's own (level 0). With
    ``restrict_to_tissue`` (default) pixels more than one tissue-mask pixel (8 µm by default) outside the tissue mask are background: the plan's
    ``tissue`` is reused when given, else detected again. Returns statistics for the cohort table:
    per-class areas (µm²), tissue megapixels, tile count and timings split into wait (upstream
    inference, when the iterable is lazy), stitch and write.
    """
    t_start = time.perf_counter()
    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = [str(n) for n in class_names]
    if not class_names:
        raise SegmentError(f"{slide_path}: class_names is empty")
    colors = (
        [tuple(int(v) for v in c[:3]) for c in class_colors]
        if class_colors is not None
        else default_colors(len(class_names))
    )
    if len(colors) != len(class_names):
        raise SegmentError(f"{slide_path}: {len(class_names)} class names but {len(colors)} colours")
    n_labels = len(class_names) + 1
    if n_labels > 255:
        raise SegmentError(f"{slide_path}: at most 254 classes fit a uint8 mask, got {len(class_names)}")

    with open_any(slide_path, mpp_override) as slide:
        slide_mpp = float(slide.mpp)  # type: ignore[arg-type]
        w0, h0 = slide.dimensions
        if restrict_to_tissue and tissue is None:
            tissue = detect_tissue(slide, tissue_params or TissueParams())
        thumb = slide.thumbnail(thumbnail_px) if write_overlay_png else None
    out_mpp = float(output_mpp or slide_mpp)
    r = out_mpp / slide_mpp
    H, W = max(1, math.ceil(h0 / r - 1e-9)), max(1, math.ceil(w0 / r - 1e-9))
    stem = slide_stem(slide_path)
    paths = {k: out_dir / f"{stem}{suf}" for k, suf in OUTPUT_SUFFIXES.items()}
    if geojson_gzip:
        paths["geojson"] = paths["geojson"].with_name(paths["geojson"].name + ".gz")

    stats: dict[str, Any] = {
        "slide": str(slide_path),
        "slide_id": stem,
        "output_mpp": out_mpp,
        "slide_mpp": slide_mpp,
    }
    t_wait = t_stitch = 0.0
    n_tiles = 0
    canvas = Canvas(
        scratch_dir or out_dir,
        (H, W),
        n_labels,
        chunk=chunk,
        blend=blend,
        dtype=canvas_dtype,
        max_open_mb=max_open_mb,
    )  # type: ignore[arg-type]
    try:
        it = iter(_iter_tile_results(tile_results, None))
        while True:
            t0 = time.perf_counter()
            try:
                x, y, size0, maps = next(it)
            except StopIteration:
                t_wait += time.perf_counter() - t0
                break
            t1 = time.perf_counter()
            t_wait += t1 - t0
            if maps.shape[0] != n_labels:
                raise SegmentError(
                    f"{slide_path}: tile at x={x} y={y} has {maps.shape[0]} channels, expected {n_labels} "
                    f"(background + {len(class_names)} classes {class_names})"
                )
            i0, j0, out = tile_to_output(x, y, size0, maps, r)
            if out.size:
                canvas.add(i0, j0, out)
            n_tiles += 1
            t_stitch += time.perf_counter() - t1

        t2 = time.perf_counter()
        geo_factor = 1
        # Powers of two dividing the TIFF tile, so every band the writer asks for starts on a block.
        while max(H, W) / geo_factor > geojson_max_px and tiff_tile % (geo_factor * 2) == 0:
            geo_factor *= 2
        bands = _BandWriter(canvas, tissue if restrict_to_tissue else None, r, n_labels, geo_factor)
        levels = write_pyramid(
            paths["mask"],
            bands,
            (H, W),
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
        t_mask = time.perf_counter() - t2
    finally:
        chunks = canvas.chunks_on_disk
        canvas.close()

    t3 = time.perf_counter()
    counts = bands.counts[:n_labels]
    px_um2 = out_mpp * out_mpp
    tissue_px = int(counts[1:].sum())
    areas = {name: float(counts[k] * px_um2) for k, name in enumerate(class_names, start=1)}
    if write_geojson:
        scale = geo_factor * r  # level-0 pixels per downsampled mask pixel
        geoms = mask_to_geometries(bands.small, labels=list(range(1, n_labels)), scale=scale)
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
        write_annotations(paths["geojson"], anns, id_seed=f"{stem}/classes")
    t_geo = time.perf_counter() - t3
    t4 = time.perf_counter()
    if write_overlay_png and thumb is not None:
        write_overlay(paths["overlay"], thumb, bands.small, class_names, colors)
    t_overlay = time.perf_counter() - t4

    stats.update(
        {
            "n_tiles": n_tiles,
            "shape": (H, W),
            "levels": len(levels),
            "class_areas_um2": areas,
            "class_pixels": {name: int(counts[k]) for k, name in enumerate(class_names, start=1)},
            "segmented_area_um2": float(tissue_px * px_um2),
            "tissue_area_um2": float(tissue.area_um2)
            if tissue is not None
            else float(w0 * h0 * slide_mpp**2),
            "canvas_chunks": chunks,
            "geojson_downsample": geo_factor,
            "paths": {
                k: str(p)
                for k, p in paths.items()
                if (k != "geojson" or write_geojson) and (k != "overlay" or write_overlay_png)
            },
            "wait_s": t_wait,
            "stitch_s": t_stitch,
            "mask_write_s": t_mask,
            "geojson_s": t_geo,
            "overlay_s": t_overlay,
            "write_s": t_mask + t_geo + t_overlay,
            "total_s": time.perf_counter() - t_start,
        }
    )
    stats["tissue_mpix"] = stats["tissue_area_um2"] / slide_mpp**2 / 1e6
    return stats


# ------------------------------------------------------------------------------------- local driver


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
    overlap: float = 0.25,
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
