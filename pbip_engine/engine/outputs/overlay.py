"""QC overlay: the slide thumbnail with the predicted classes blended in, plus a small legend.

A person scanning a cohort looks at PNGs, not at pyramids: one glance shows whether the model painted
glass, missed tissue, or confused classes. The mask may come at any resolution; it is resized to the
thumbnail with nearest-neighbour (labels must never be interpolated).

The same blend is also written as an RGB OME-TIFF pyramid (:func:`write_overlay_pyramid`) whose physical
pixel size makes it line up with the slide, so QuPath can open it beside the slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pbip_engine.engine.io.atomic import atomic_write_bytes
from pbip_engine.engine.outputs.tiff_writer import write_pyramid

# Distinct colours for classes 1..N when the spec gives none (tab10 without grey).
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (214, 39, 40),
    (44, 160, 44),
    (31, 119, 180),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (227, 119, 194),
    (188, 189, 34),
    (140, 86, 75),
)


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` class colours (cycled from :data:`DEFAULT_COLORS`)."""
    return [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n)]


def colorize(mask: np.ndarray, class_colors: Sequence[Sequence[int]]) -> np.ndarray:
    """RGB image of a label mask: class k gets ``class_colors[k-1]``, background 0 is black."""
    lut = np.zeros((256, 3), np.uint8)
    for k, c in enumerate(class_colors, start=1):
        lut[k] = [int(v) for v in c[:3]]
    return lut[np.asarray(mask, np.uint8)]


def blend_overlay(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    class_colors: Sequence[Sequence[int]],
    *,
    alpha: float = 0.45,
    outline: bool = True,
) -> np.ndarray:
    """Thumbnail (RGB uint8) with class colours blended at ``alpha`` where ``mask > 0``.

    ``outline`` draws class boundaries at full opacity so thin regions stay visible at low alpha.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be RGB uint8 (h, w, 3), got {thumb.shape} {thumb.dtype}")
    mask = np.asarray(mask, np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = thumb.shape[:2]
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    color = colorize(mask, class_colors)
    fg = mask > 0
    out = thumb.copy()
    mixed = (1.0 - alpha) * thumb[fg].astype(np.float32) + alpha * color[fg].astype(np.float32)
    out[fg] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    if outline:
        edge = np.zeros_like(fg)
        edge[:-1] |= mask[:-1] != mask[1:]
        edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
        edge &= fg
        out[edge] = color[edge]
    return out


def add_legend(
    rgb: np.ndarray, class_names: Sequence[str], class_colors: Sequence[Sequence[int]], row_px: int = 18
) -> np.ndarray:
    """A white legend strip (colour swatch + name per class) appended below ``rgb``."""
    w = rgb.shape[1]
    strip = np.full((row_px * len(class_names) + 6, w, 3), 255, np.uint8)
    for i, (name, c) in enumerate(zip(class_names, class_colors, strict=True)):
        y = 3 + i * row_px
        cv2.rectangle(strip, (4, y + 2), (4 + row_px - 4, y + row_px - 2), tuple(int(v) for v in c[:3]), -1)
        cv2.putText(
            strip,
            str(name),
            (row_px + 6, y + row_px - 5),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return np.concatenate([rgb, strip], axis=0)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode RGB uint8 as PNG and write it atomically (temp file + rename)."""
    path = Path(path)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())
    return path


def write_overlay(
    path: str | Path,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]] | None = None,
    *,
    alpha: float = 0.45,
    legend: bool = True,
) -> Path:
    """``<slide>.overlay.png``: thumbnail + blended mask (+ legend); returns the path."""
    colors = list(class_colors) if class_colors is not None else default_colors(len(class_names))
    img = blend_overlay(thumbnail, mask, colors, alpha=alpha)
    if legend and class_names:
        img = add_legend(img, class_names, colors)
    return write_png(path, img)


def write_overlay_pyramid(
    path: str | Path,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    class_colors: Sequence[Sequence[int]],
    mpp: float,
    *,
    alpha: float = 0.45,
    tile: int = 256,
    min_size: int = 256,
) -> Path:
    """``<slide>.overlay.ome.tif``: the blend as a JPEG RGB OME-TIFF pyramid at ``mpp`` µm per pixel.

    ``mpp`` is the thumbnail's pixel size (the slide's µm/px times its downsampling), so the overlay
    covers the same physical extent as the slide; no legend strip, which would break that alignment.
    """
    img = blend_overlay(thumbnail, mask, class_colors, alpha=alpha)
    write_pyramid(
        path, img, img.shape[:2], mpp, kind="rgb", tile=tile, min_size=min_size, ome=True, quality=90
    )
    return Path(path)
