"""Contact sheet of a prototype bank: one row per (class, sub-class), its tiles nearest the centre.

The bank is only as good as what its sub-classes look like; this PNG is the quickest way for a pathologist
to see whether "TUM k=2" is really a tumour morphology or a cluster of blur, pen or fat.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from pbip_engine.engine.io.atomic import atomic_write_bytes
from pbip_engine.engine.prototypes.bank import Bank, BankError

LABEL_BG = (40, 40, 40)
EMPTY_BG = (128, 128, 128)


def gallery_shape(bank: Bank, per_row: int = 8, thumb: int = 96) -> tuple[int, int]:
    """(height, width) of the PNG: ``sum(k)`` rows x (label cell + ``per_row`` tiles), square cells."""
    return sum(bank.k) * thumb, (per_row + 1) * thumb


def _label_cell(name: str, j: int, n: int, thumb: int) -> np.ndarray:
    return label_cell([name, f"k={j + 1}", f"n={n}"], thumb)


def label_cell(lines: list[str], thumb: int) -> np.ndarray:
    """A dark square with a few lines of white text (a row's caption in the gallery and the atlas)."""
    cell = np.full((thumb, thumb, 3), LABEL_BG, np.uint8)
    scale = max(0.3, thumb / 200)
    thick = 1 if thumb < 160 else 2
    step = thumb // (len(lines) + 1)
    for i, text in enumerate(lines):
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        s = scale * min(1.0, (thumb - 6) / max(tw, 1))  # shrink long class names to fit
        cv2.putText(
            cell,
            text,
            (3, step * (i + 1) + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            s,
            (255, 255, 255),
            thick,
            cv2.LINE_AA,
        )
    return cell


def thumbnail(tile: np.ndarray, tile_id: str, thumb: int) -> np.ndarray:
    a = np.asarray(tile)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise BankError(
            f"gallery: tile {tile_id} is not an H,W,3 uint8 RGB image (shape {a.shape}, {a.dtype})"
        )
    a = a[:, :, :3]
    interp = cv2.INTER_AREA if min(a.shape[:2]) >= thumb else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(a), (thumb, thumb), interpolation=interp)


def write_gallery(
    path: str | Path,
    bank: Bank,
    fetch_tile: Callable[[str], np.ndarray],
    per_row: int = 8,
    thumb: int = 96,
) -> Path:
    """Write the bank's contact sheet as a PNG (atomically) and return its path.

    ``fetch_tile(tile_id)`` returns an RGB uint8 tile (any size; resized to ``thumb``). Rows follow the
    bank's class-major prototype order; each row shows the first ``per_row`` members, nearest first.
    """
    if per_row < 1 or thumb < 16:
        raise BankError(f"gallery: per_row must be >= 1 and thumb >= 16 (got {per_row}, {thumb})")
    h, w = gallery_shape(bank, per_row, thumb)
    sheet = np.full((h, w, 3), EMPTY_BG, np.uint8)
    for row, ((name, j), mem) in enumerate(zip(bank.subclass_labels(), bank.members, strict=True)):
        y = row * thumb
        sheet[y : y + thumb, :thumb] = _label_cell(name, j, len(mem), thumb)
        for col, tid in enumerate(mem[:per_row]):
            try:
                tile = fetch_tile(tid)
            except Exception as e:
                raise BankError(f"gallery: could not fetch tile {tid}: {type(e).__name__}: {e}") from e
            x = (col + 1) * thumb
            sheet[y : y + thumb, x : x + thumb] = thumbnail(tile, tid, thumb)
        cv2.line(sheet, (0, y), (w - 1, y), (255, 255, 255), 1)
    return write_png(path, sheet, "gallery")


def write_png(path: str | Path, rgb: np.ndarray, what: str) -> Path:
    """An RGB uint8 sheet as a PNG, written atomically (the gallery's and the atlas's last step)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BankError(f"{what}: PNG encoding failed for {path}")
    return atomic_write_bytes(path, png.tobytes())
