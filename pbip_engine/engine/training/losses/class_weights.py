"""Class weights for the stage-2 loss, from the pseudo masks themselves (``segmenter.class_weights``).

Why: stage 2 amplifies the class balance of its pseudo masks. On GlaS, masks that label 42 % of the pixels
gland (truth: 50 %) give a segmenter that predicts 35-39 % gland on testA, and masks at 30 % give 8 %
(BENCHMARKS.md, issue 15): pixels the CAMs under-label teach the network that the class is rare and its
look ambiguous. Weighting each class by its inverse pixel frequency (scikit-learn's "balanced":
``total / (classes present x count)``) moves the decision threshold back. The counts come from the pseudo
masks, never from ground truth, so the weights are available to any weakly supervised run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pbip_engine.engine.metrics import IGNORE_INDEX

MAX_WEIGHT = 10.0  # a class on a handful of pixels would otherwise dominate the loss


def mask_class_counts(
    masks: Iterable[np.ndarray], n_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Pixel count per class ``0..n_classes-1`` over ``masks`` (uint8 ``h,w``); ``ignore_index`` is skipped."""
    counts = np.zeros(n_classes, np.int64)
    for m in masks:
        v = np.asarray(m).ravel()
        v = v[v != ignore_index]
        if v.size and int(v.max()) >= n_classes:
            raise ValueError(
                f"mask value {int(v.max())} is not a class 0..{n_classes - 1} nor {ignore_index}"
            )
        counts += np.bincount(v, minlength=n_classes)[:n_classes]
    return counts


def balanced_weights(counts: Sequence[int], max_weight: float = MAX_WEIGHT) -> list[float]:
    """``total / (present x count)`` per class, clipped to ``[1 / max_weight, max_weight]``; 1.0 for a class
    with no pixels (it never appears as a target, so its weight is never used)."""
    c = np.asarray(counts, np.float64)
    present = c > 0
    if not present.any():
        raise ValueError("no labelled pixels in the pseudo masks: cannot balance the classes")
    w = np.ones_like(c)
    w[present] = c[present].sum() / (present.sum() * c[present])
    return [float(x) for x in np.clip(w, 1.0 / max_weight, max_weight)]
