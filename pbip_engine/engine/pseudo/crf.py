"""Dense CRF post-processing of pseudo masks (Krähenbühl & Koltun's fully connected CRF), as LPD applies
at inference; off by default (``pseudo.crf``), and only where the optional ``pydensecrf2`` package is installed.

Unaries come from the class scores of the pixel (the allowed classes' fused CAMs, plus the ``power``
background score when that rule is on, per tile), normalised to probabilities; absent classes are not in
the CRF at all, so the pairwise terms can never bring them back.

Where the pseudo stage stitches (``pseudo.stitch``) the CRF runs once on each slide's stitched canvas
(``canvas_crf``), so a gland's edge is settled by the pixels on both sides of it, not by the 56 px of one
tile: on GlaS this lifts the whole-image pseudo masks by 0.012-0.018 mIoU over a wide range of kernels,
where the per-tile CRF lost 0.017 (BENCHMARKS.md, session 25). The kernels (``CrfKernels``) are set in µm
by the spec and reach here in px; LPD's reference settings (``LPD_REFERENCE``) smooth too far at GlaS's
half resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pbip_engine.engine.pseudo.regions import cuts

ITERATIONS = 5
EPS = 1e-5


@dataclass(frozen=True)
class CrfKernels:
    """The CRF's two pairwise kernels, in px of the image it runs on: a smoothness kernel (positions only)
    and an appearance kernel (positions and colour), each with its weight (``compat``)."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 8.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = ITERATIONS


#: LPD's reference settings (px of its 0.62 µm/px GlaS images). On whole GlaS images at 1.24 µm/px they
#: smooth glands away (pseudo mIoU 0.703 against 0.719 without a CRF; BENCHMARKS.md, session 25).
LPD_REFERENCE = CrfKernels(15, 30, 10, 20, 50)


class CrfUnavailable(RuntimeError):
    pass


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _marginals(scores: np.ndarray, rgb: np.ndarray, kernels: CrfKernels) -> np.ndarray:
    """float32 ``C,H,W`` mean-field marginals of ``C,H,W`` non-negative scores on a uint8 ``H,W,3`` image."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise CrfUnavailable(
            "pseudo.crf needs the optional package pydensecrf2 (pip install pydensecrf2)"
        ) from e
    c, h, w = scores.shape
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"crf: image {rgb.shape[:2]} and scores {(h, w)} differ in size")
    p = np.clip(np.asarray(scores, np.float64), 0, None) + EPS
    p /= p.sum(0, keepdims=True)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(p).reshape(c, -1), dtype=np.float32))
    d.addPairwiseGaussian(sxy=kernels.gaussian_sxy, compat=kernels.gaussian_compat)
    d.addPairwiseBilateral(sxy=kernels.bilateral_sxy, srgb=kernels.bilateral_srgb,
                           rgbim=np.ascontiguousarray(rgb[..., :3], dtype=np.uint8),
                           compat=kernels.bilateral_compat)  # fmt: skip
    return np.asarray(d.inference(kernels.iterations), np.float32).reshape(c, h, w)


def dense_crf(scores: np.ndarray, rgb: np.ndarray, kernels: CrfKernels | None = None) -> np.ndarray:
    """``C,H,W`` non-negative scores + uint8 ``H,W,3`` image -> ``H,W`` index of the winning channel."""
    if scores.shape[0] == 1:
        return np.zeros(scores.shape[1:], np.int64)
    return _marginals(scores, rgb, kernels or CrfKernels()).argmax(0)


def canvas_crf(
    scores: np.ndarray,
    allowed: np.ndarray,
    rgb: np.ndarray,
    kernels: CrfKernels,
    window: int = 1024,
) -> np.ndarray:
    """The CRF over one slide's stitched canvas: ``C,H,W`` class scores, bool ``C,H,W`` classes allowed per
    pixel, uint8 ``H,W,3`` pixels -> int ``H,W`` winning class among the allowed ones (``-1`` where none is).

    A disallowed class gets (almost) no probability in the unaries, so the appearance kernel cannot carry it
    across a label's border. Canvases larger than ``window`` run in windows of at most that much, each read
    with a margin of three appearance kernels, whose result is dropped: what a pixel's label depends on lies
    well inside it, and the memory stays that of one window. The marginals' leads are not returned: as
    margins for ``pseudo.ignore_uncertain`` they taught stage 2 worse than the CAMs' (BENCHMARKS.md, GlaS,
    sessions 25-26).
    """
    c, h, w = scores.shape
    winner = np.full((h, w), -1, np.int64)
    if c == 0:
        return winner
    s = np.where(allowed, np.clip(scores, 0, None), 0.0).astype(np.float32)
    pad = int(np.ceil(3 * max(kernels.bilateral_sxy, kernels.gaussian_sxy)))
    for y0, y1 in cuts(h, window):
        for x0, x1 in cuts(w, window):
            a0, a1, b0, b1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
            ok = allowed[:, a0:a1, b0:b1]
            if c == 1 or not (ok.sum(0) > 1).any():  # nothing to decide here: the labels settle it
                q = ok.astype(np.float32)
            else:
                q = _marginals(s[:, a0:a1, b0:b1], rgb[a0:a1, b0:b1], kernels)
            core = (slice(None), slice(y0 - a0, y1 - a0), slice(x0 - b0, x1 - b0))
            q, ok = q[core], ok[core]
            winner[y0:y1, x0:x1] = np.where(ok.any(0), np.where(ok, q, -np.inf).argmax(0), -1)
    return winner
