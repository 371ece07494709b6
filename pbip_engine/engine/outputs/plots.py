"""Pictures for the run report: training curves from a ``metrics.jsonl`` and small previews of big PNGs.

matplotlib draws the curves (Agg, no display needed); previews are downscaled with OpenCV so that a
report of a large cohort stays light in a browser while linking to the full-size originals.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.io.atomic import atomic_write_bytes

# Validation entries that are not per-epoch scores (sizes, flags, per-class lists).
_NOT_A_SCORE = {
    "classes",
    "ignore_background",
    "n_pixels",
    "n_abstained_pixels",
    "n_images",
    "n_ignored_pixels",
}


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in d.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and k not in _NOT_A_SCORE
        and math.isfinite(v)
    }


def curve_series(
    rows: Sequence[dict[str, Any]],
) -> tuple[list[int], dict[str, list[float]], dict[str, list[float]]]:
    """(epochs, losses, validation scores) from ``metrics.jsonl`` rows, one value per epoch and key.

    Losses are the training ``loss`` and the validation ``loss``; scores are the other numeric validation
    entries (mIoU, Dice, accuracy, the model-selection ``score``). A key missing in some epoch gets NaN,
    so every series lines up with ``epochs``.
    """
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    losses: dict[str, list[float]] = {}
    scores: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        val = _numbers(r.get("val") or {})
        entries = {"train loss": r.get("loss")}
        if "loss" in val:
            entries["validation loss"] = val.pop("loss")
        for k, v in entries.items():
            if isinstance(v, int | float):
                losses.setdefault(k, [math.nan] * len(rows))[i] = float(v)
        for k, v in val.items():
            scores.setdefault(k, [math.nan] * len(rows))[i] = v
    # The model-selection score repeats a metric (mIoU) or the negated validation loss: drawn once.
    score = scores.get("score")
    neg_loss = [-v for v in losses.get("validation loss", [])]
    if score is not None and (
        score == neg_loss or any(v == score for k, v in scores.items() if k != "score")
    ):
        del scores["score"]
    return epochs, losses, scores


def training_curves_png(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """PNG of the losses (left) and validation scores (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs, losses, scores = curve_series(rows)
    fig = Figure(figsize=(9, 3.2), dpi=96, layout="constrained")
    ax_l, ax_s = fig.subplots(1, 2)
    for name, ys in losses.items():
        ax_l.plot(epochs, ys, marker="o", label=name)
    ax_l.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    for name, ys in scores.items():
        ax_s.plot(epochs, ys, marker="o", label=name)
    ax_s.set(xlabel="epoch", title=f"{title}: validation")
    for ax, series in ((ax_l, losses), (ax_s, scores)):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def preview(src: Path, dst: Path, max_px: int = 800, quality: int = 85) -> Path | None:
    """A copy of image ``src`` whose longer side is at most ``max_px`` (JPEG or PNG after ``dst``'s
    suffix); None when ``src`` cannot be read."""
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    s = max_px / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if dst.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(dst.suffix, np.ascontiguousarray(img), params)
    if not ok:
        return None
    atomic_write_bytes(dst, buf.tobytes())
    return dst
