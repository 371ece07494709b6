"""Step (b) of segmenting a slide: read tile pixels and turn them into class maps in batches.

:class:`TileReader` and :class:`SegmentPredictor` are Ray Data ``map_batches`` callables (an actor pool
in ``jobs/infer``) and plain callables for :func:`~pbip_engine.engine.inference.local.segment_local`:
``{"image": uint8 B,h,w,3, x, y, size0, ...}`` -> ``{"logits" (or "probs"): float16 B,C,h',w', x, y, ...}``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.inference.plan import TILE_KEYS, SegmentError, open_any
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD
from pbip_engine.engine.wsi.slides import Slide
from pbip_engine.engine.wsi.tiling import TileSpec, iter_tiles


def _read_padded(slide: Slide, t: TileSpec, tile_px: int) -> np.ndarray:
    """A tile that hangs over the slide border: read the inside part, pad by reflection, resize.

    The pad is never predicted on (stitching crops it), but it is context for the pixels near the border.
    White would be artificial glass, which the model learnt to call background and which pulls the image's
    own border towards it; a small whole image (a GlaS patch under one tile) would be mostly glass. The
    reflected image is the context the model saw in training: tissue, not a frame.
    """
    w0, h0 = slide.dimensions
    lds = slide.level_downsamples[t.level]
    lw, lh = slide.level_dimensions[t.level]
    rw = max(1, min(t.read_size, lw - math.floor(t.x / lds), math.ceil((w0 - t.x) / lds)))
    rh = max(1, min(t.read_size, lh - math.floor(t.y / lds), math.ceil((h0 - t.y) / lds)))
    region = slide.read_region((t.x, t.y), t.level, (rw, rh))
    region = np.ascontiguousarray(region, dtype=np.uint8)
    canvas = cv2.copyMakeBorder(region, 0, t.read_size - rh, 0, t.read_size - rw, cv2.BORDER_REFLECT_101)
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


class SegmentPredictor:
    """Callable tile-batch predictor; build once per actor/process (the model is loaded in ``__init__``).

    ``__call__({"image": uint8 B,h,w,3, ...}) -> {"logits": float16 B,C,h',w', ...}`` with every other
    key passed through (tile coordinates, slide path). ``output="probs"`` returns softmax probabilities
    under the key ``"probs"`` instead. ``output_scale`` < 1 downsamples the maps on the device
    (h' = round(h * output_scale)) so less data leaves the GPU when the output mpp is coarser than the
    model's. Normalisation uses the model's own ``mean``/``std``. ``tta`` averages the logits of the
    tile and its horizontal and vertical mirrors (mapped back): tissue has no orientation, and the
    average smooths decisions that flip with the view, at three forward passes per tile. ``tta`` may
    also be a list of scales (e.g. 0.75, 1, 1.25): the three views at each, resized back (3 passes per
    scale), which evens out the size of structures the model saw in training (OEEM tests at 8 scales).
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
        tta: bool | Sequence[float] = False,
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
            from pbip_engine.engine.training.segmentation import load_segmenter

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
        self.tta = bool(tta)
        self.tta_scales = (1.0,) if tta is True or not tta else tuple(float(v) for v in tta)
        if any(v <= 0 for v in self.tta_scales):
            raise SegmentError(f"TTA scales must be > 0, got {list(self.tta_scales)}")
        self.channels_last = bool(channels_last)  # NHWC: faster convolutions on CPU (oneDNN) and GPU alike
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=self.device).view(1, 3, 1, 1)
        self._shift = torch.tensor(
            [-m / s for m, s in zip(self.mean, self.std, strict=True)], device=self.device
        ).view(1, 3, 1, 1)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``B,h,w,3`` -> float16 ``B,C,h',w'`` (logits or probabilities)."""
        import torch
        import torch.nn.functional as F

        from pbip_engine.engine.training.amp import autocast

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
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, self.amp):
                    y = self._tta(x) if self.tta else self.model(x).float()
                if self.output_scale < 1.0:
                    size = [max(1, round(s * self.output_scale)) for s in y.shape[-2:]]
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
                if self.output == "probs":
                    y = y.softmax(1)
                outs.append(y.half().cpu().numpy())
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, self.n_classes or 1, 1, 1), np.float16)

    def _tta(self, x: Any) -> Any:
        """Mean logits over the tile and its two mirrors at each TTA scale, mapped back to the tile."""
        import torch.nn.functional as F

        size, total, n = x.shape[-2:], None, 0
        for s in self.tta_scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            for dim in (None, -1, -2):
                y = self.model(xs if dim is None else xs.flip(dim)).float()
                y = y if dim is None else y.flip(dim)
                if tuple(y.shape[-2:]) != tuple(size):
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                total = y if total is None else total + y
                n += 1
        return total / n

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if "image" not in batch:
            raise SegmentError(f"SegmentPredictor batch needs an 'image' column, got {sorted(batch)}")
        out = {k: v for k, v in batch.items() if k != "image"}
        out[self.output] = self.predict(batch["image"])
        return out
