"""Image-specific prototypes: re-read a slide's CAMs against prototypes taken from that slide's own pixels.

A prototype CAM scores a pixel by the cosine between its feature and a class prototype. The cohort's
prototypes (the bank's, or learnt ones) are averages over every slide. But within one slide, stain, scanner
and tissue state make a class look more like itself than like the cohort's average. SIPE (Chen et al., CVPR
2022) uses this: from the pixels the CAMs already label with confidence, it builds per-image class
prototypes, and it re-scores every pixel against them.

Here the pixels with confidence ("seeds") of a slide are of two kinds:
- those its tile labels settle (one class allowed; on GlaS these labels are right);
- the ``fraction`` of the CAM-decided pixels with the largest margin between the two best allowed classes.

Per feature level, a class's prototype is the mean of the L2-normalised features over its seeds. A tile's
image-specific CAM is then the softmax over the classes of ``sum_l w_l * cos(f_l, p_l)``, with ``w_l`` the
level's fuse weight times its logit scale (the same units as the ``raw`` read-out). It is mixed with the
cohort CAM by ``weight``. A slide where a listed class has too few seeds keeps its cohort CAMs.

Measured on GlaS train (85 images, whole-image offline check, BENCHMARKS.md session 22): pseudo masks
0.654 -> 0.720, and the same within 0.002 for seed fractions 0.3 to 1.0. Two prototypes per class (``k``,
session 35): 0.733 -> 0.743 and 0.732 -> 0.743 on two ClassNets of ``examples/glas.yaml``'s recipe. The pixels
a fill or a background rule labels are never seeds: a lumen is textureless, and glass is not tissue.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy.special import softmax

from pbip_engine.engine.pseudo.cams import UNCERTAIN
from pbip_engine.engine.pseudo.stitch import margin_quantile, resize_maps

MIN_SEED_CELLS = 4  # fewest feature cells a listed class needs, per level, for its slide prototype


def seed_masks(
    masks: Sequence[np.ndarray], margins: Sequence[np.ndarray], fraction: float
) -> list[np.ndarray]:
    """Per tile, uint8 ``h,w``: the class of each seed pixel, 0 elsewhere.

    ``masks``/``margins``: a slide's stitched masks *before* any hole fill and their decision margins
    (``stitch.stitched_masks_and_margins``): ``inf`` where the labels decided, finite where the CAMs did.
    Seeds: the label-decided pixels (not background, not UNCERTAIN), and the ``fraction`` of the slide's
    CAM-decided pixels with the largest margins."""
    cut = margin_quantile(margins, 1.0 - fraction) if fraction > 0 else None
    cut = np.inf if cut is None else cut
    out = []
    for mask, margin in zip(masks, margins, strict=True):
        real = (mask != 0) & (mask != UNCERTAIN)
        keep = real & (~np.isfinite(margin) | (margin >= cut))
        out.append(np.where(keep, mask, 0).astype(np.uint8))
    return out


def slide_prototypes(
    features: Sequence[Sequence[np.ndarray]],
    seeds: Sequence[np.ndarray],
    classes: Sequence[int],
    n: int,
    k: int = 1,
) -> list[np.ndarray] | None:
    """Per level, float32 ``n,k,C`` unit prototypes (rows k-1 for class k; zero rows for classes not in
    ``classes``) from the tiles' ``features`` (per tile, per level ``C,h,w``, unit vectors along C) over the
    ``seeds`` (per tile uint8 ``H,W``, resized to each level by nearest neighbour). None when a class in
    ``classes`` has fewer than ``MIN_SEED_CELLS`` seed cells at some level.

    ``k`` > 1: each class is the cosine K-means centres of its seed cells, not their one mean. A class within a
    slide is rarely one look (non-gland is stroma, lymphocytes and muscle; gland is epithelium and lumen), and
    a single mean sits between its modes, nearer the other class than any of them. A class with fewer than
    ``k * MIN_SEED_CELLS`` cells gets fewer centres (repeated to fill ``k``); the clustering sees at most
    ``KMEANS_CELLS`` cells per class and level, a seeded sample."""
    if not features:
        return None
    out = []
    for lvl in range(len(features[0])):
        cells = [_level_cells(feats[lvl], s) for feats, s in zip(features, seeds, strict=True)]
        count = np.bincount(np.concatenate([s for _, s in cells]), minlength=n + 1)
        if any(count[c] < MIN_SEED_CELLS for c in classes):
            return None
        c_dim = features[0][lvl].shape[0]
        protos = np.zeros((n, k, c_dim), np.float32)
        for c in classes:
            if k == 1:  # the mean, streamed over the tiles
                v = sum(flat[s == c].astype(np.float64).sum(0) for flat, s in cells) / count[c]
                protos[c - 1] = v / max(np.linalg.norm(v), 1e-12)
            else:
                protos[c - 1] = _centres(cells, c, int(count[c]), k)
        out.append(protos)
    return out


KMEANS_CELLS = 20_000  # most seed cells of one class and level that the clustering of a slide sees


def _level_cells(f: np.ndarray, seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tile's features at one level as ``cells,C`` and its seeds resized to that level (flattened)."""
    s = cv2.resize(seed, (f.shape[2], f.shape[1]), interpolation=cv2.INTER_NEAREST).ravel()
    return f.reshape(f.shape[0], -1).T, s


def _centres(cells: list[tuple[np.ndarray, np.ndarray]], c: int, count: int, k: int) -> np.ndarray:
    """``k,C`` unit cosine K-means centres of class ``c``'s seed cells. Above ``KMEANS_CELLS`` each tile gives
    a seeded random share of its cells, so a large slide's seeds are never copied whole."""
    from pbip_engine.engine.prototypes.bank import cosine_kmeans

    rng = np.random.default_rng(0)  # fixed: the same slide and seeds always give the same prototypes
    keep = KMEANS_CELLS / count
    picks = [(s == c) if keep >= 1 else (s == c) & (rng.random(len(s)) < keep) for _, s in cells]
    x = np.concatenate([flat[p] for (flat, _), p in zip(cells, picks, strict=True)]).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    m = max(1, min(k, len(x) // MIN_SEED_CELLS))
    centres, _ = cosine_kmeans(x, m, seed=0, n_init=1)
    return centres[np.arange(k) % m]


def prototype_cam(
    features: Sequence[np.ndarray],
    prototypes: Sequence[np.ndarray],
    weights: Sequence[float],
    size: tuple[int, int],
) -> np.ndarray:
    """float32 ``N,h,w`` (``size``): the softmax over classes of ``sum_l weights[l] * cos(features[l],
    prototypes[l])``, each level's cosine map resized to ``size`` bilinearly. A class with several prototypes
    (``n,k,C``) scores a cell by the nearest of them."""
    logits = sum(
        resize_maps(_nearest(f.astype(np.float32), p), tuple(size)) * np.float32(w)
        for f, p, w in zip(features, prototypes, weights, strict=True)
    )
    return softmax(logits, axis=0).astype(np.float32)


def _nearest(f: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``N,h,w``: each class's best cosine between ``C,h,w`` features and its prototypes (``N,k,C``)."""
    return np.einsum("chw,nkc->nkhw", f, p).max(1)


def image_prototype_cams(
    cams: Sequence[np.ndarray],
    features: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    masks: Sequence[np.ndarray],
    margins: Sequence[np.ndarray],
    labels: np.ndarray,
    fraction: float,
    weight: float,
    k: int = 1,
) -> tuple[list[np.ndarray], bool]:
    """A slide's tile CAMs re-read against its own prototypes: ``(1 - weight) * cam + weight * image CAM``.

    ``cams``: per tile ``N,h,w`` (the read-out the masks come from); ``features``: per tile, per level unit
    ``C,h_l,w_l``; ``weights``: per level; ``masks``/``margins``: the slide's stitched masks before any fill and
    their margins; ``labels``: multi-hot ``T,N``; ``k``: prototypes per class (:func:`slide_prototypes`). Returns
    the new CAMs and whether they changed (False: a listed class had too few seeds, and the cohort CAMs stand)."""
    seeds = seed_masks(masks, margins, fraction)
    listed = [c + 1 for c in np.flatnonzero(np.asarray(labels).max(0) > 0.5)]  # not k: that is the count
    protos = slide_prototypes(features, seeds, listed, np.asarray(labels).shape[1], k)
    if protos is None:
        return list(cams), False
    out = []
    for cam, feats in zip(cams, features, strict=True):
        own = prototype_cam(feats, protos, weights, cam.shape[1:])
        out.append(((1.0 - weight) * cam + weight * own).astype(np.float32))
    return out, True
