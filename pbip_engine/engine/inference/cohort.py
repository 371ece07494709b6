"""Scoring a segmented cohort against truth masks, slide by slide and as one confusion matrix.

The cohort figure is one confusion matrix over every scored pixel, not a mean of slide figures, so a
large slide weighs by its size; the truth may use another label convention (``truth_lut``) or be finer
than the written mask (it is resampled, nearest, to the mask's frame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbip_engine.engine.metrics import MetricsError, SegmentationMeter, index_mask_dir, read_mask

SLIDE_METRICS = ("miou", "mdice", "mbiou")


def score_slide_mask(
    mask_path: Path, truth_path: Path, n_classes: int, truth_lut: list[int] | None = None
) -> SegmentationMeter:
    """A whole-slide mask against a truth mask (PNG or pyramid) of the same level-0 frame (nearest resampling)."""
    import cv2
    import numpy as np

    pred = read_mask(mask_path)
    truth = read_mask(truth_path)
    if truth_lut is not None:
        if truth.size and int(truth.max()) >= len(truth_lut):
            raise MetricsError(
                f"{truth_path}: value {int(truth.max())} outside segment.truth_lut {truth_lut}"
            )
        truth = np.asarray(truth_lut, dtype=np.uint8)[truth]
    if truth.shape != pred.shape:
        truth = cv2.resize(truth, (pred.shape[1], pred.shape[0]), interpolation=cv2.INTER_NEAREST)
    meter = SegmentationMeter(n_classes, ignore_background=True)
    meter.update(pred, truth, name=mask_path.name)
    return meter


class CohortScorer:
    """Slide masks vs the truth folder's masks (matched by slide id); slides without truth are not scored."""

    def __init__(self, truth_dir: Path | None, n_classes: int, truth_lut: list[int] | None = None) -> None:
        self.truths = index_mask_dir(truth_dir) if truth_dir is not None else {}
        self.n_classes = n_classes
        self.truth_lut = truth_lut
        self.total = SegmentationMeter(n_classes, ignore_background=True)

    def score(self, slide_id: str, mask_path: Path) -> dict[str, Any] | None:
        """The slide's figures (added to the cohort's), or None where it has no truth."""
        if slide_id not in self.truths:
            return None
        m = score_slide_mask(mask_path, self.truths[slide_id], self.n_classes, self.truth_lut)
        self.total.merge(m)
        return {k: m.compute().get(k) for k in SLIDE_METRICS}

    def summary(self) -> dict[str, Any] | None:
        """The cohort's figures over every scored slide, or None where none was scored."""
        return self.total.compute() if self.total.n_images else None
