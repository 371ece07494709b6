"""Dense CRF post-processing of pseudo masks (Krähenbühl & Koltun's fully connected CRF), as LPD applies
at inference; off by default (``pseudo.crf``), and only where the optional ``pydensecrf2`` package is installed.

Unaries come from the class scores of the pixel (the present classes' fused CAMs, plus the ``power``
background score when that rule is on), normalised to probabilities; absent classes are not in the CRF at
all, so the pairwise terms can never bring them back. Pairwise settings are the LPD reference's
(Gaussian sxy 15, compat 30; bilateral sxy 10, srgb 20, compat 50; 5 mean-field iterations).
"""

from __future__ import annotations

import numpy as np

GAUSSIAN = {"sxy": 15, "compat": 30}
BILATERAL = {"sxy": 10, "srgb": 20, "compat": 50}
ITERATIONS = 5
EPS = 1e-5


class CrfUnavailable(RuntimeError):
    pass


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(scores: np.ndarray, rgb: np.ndarray, iterations: int = ITERATIONS) -> np.ndarray:
    """``C,H,W`` non-negative scores + uint8 ``H,W,3`` image -> ``H,W`` index of the winning channel."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise CrfUnavailable(
            "pseudo.crf needs the optional package pydensecrf2 (pip install pydensecrf2)"
        ) from e
    c, h, w = scores.shape
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"crf: image {rgb.shape[:2]} and scores {(h, w)} differ in size")
    if c == 1:
        return np.zeros((h, w), np.int64)
    p = np.clip(np.asarray(scores, np.float64), 0, None) + EPS
    p /= p.sum(0, keepdims=True)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(p).reshape(c, -1), dtype=np.float32))
    d.addPairwiseGaussian(**GAUSSIAN)
    d.addPairwiseBilateral(rgbim=np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), **BILATERAL)
    q = np.asarray(d.inference(iterations), np.float32).reshape(c, h, w)
    return q.argmax(0)
