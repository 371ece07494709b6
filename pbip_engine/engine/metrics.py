"""Segmentation metrics from ONE confusion matrix per split (as PBIP, TPRO and WSSS-Tissue's code do).

Labels follow the project convention: 0 = background / not tissue, k = tissue class k (1..N). Truth
values above N (e.g. 255) are "ignore" pixels and never counted. A predicted ``IGNORE_INDEX`` (a pseudo
mask's undecided pixel) is a miss of the pixel's true class. With h the confusion matrix (rows = truth,
columns = prediction) restricted as below:

* IoU_c = h_cc / (row_c + col_c - h_cc); Dice_c = 2 h_cc / (row_c + col_c); means over ``classes``
  (default the tissue classes 1..N; a class absent from both truth and prediction is NaN and skipped).
* FwIoU = sum_c (row_c / total) IoU_c over ``classes`` (WSSS-Tissue's form: total counts every kept pixel).
* pixel accuracy = trace(h) / total.
* Boundary IoU (Cheng et al., CVPR 2021, ``boundary-iou-api``'s ``mask_to_boundary``): per image and
  class, band = G minus G eroded d times by a 3x3 kernel after zero-padding by 1 (so the image border is a
  boundary), d = max(1, round(0.02 * image diagonal)); intersections and unions of the truth and predicted
  bands are accumulated over the split, then IoU per class and the mean over ``classes``.

``ignore_background`` is always explicit: True drops every pixel whose *truth* is 0 (WSSS-Tissue); False
keeps them, so predicting tissue there counts as a false positive (TPRO/PBIP/LPD). Results from the two
settings are not comparable, so every result dict records it, with the band width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

MASK_SUFFIXES = (
    ".mask.ome.tiff",
    ".mask.ome.tif",
    ".mask.tiff",
    ".mask.tif",
    ".ome.tiff",
    ".ome.tif",
    ".png",
    ".tiff",
    ".tif",
)
# What ``segment`` writes beside each mask that is not a mask: its RGB overlays (an RGB picture of the classes).
NOT_MASK_SUFFIXES = (".overlay.png", ".overlay.ome.tif", ".overlay.ome.tiff")
IGNORE_INDEX = 255  # in truth: not scored; in a prediction: no decision (an abstention, scored as a miss)


class MetricsError(ValueError):
    """Bad masks (shape, values) or unpaired files."""


class ConfusionMatrix:
    """Accumulates an ``n_labels x n_labels`` matrix (labels 0..n_labels-1, background included)."""

    def __init__(self, n_labels: int) -> None:
        if n_labels < 2:
            raise MetricsError(f"need at least 2 labels (background + one class), got {n_labels}")
        self.n = int(n_labels)
        self.mat = np.zeros((self.n, self.n), dtype=np.int64)
        self.abstained = np.zeros(self.n, dtype=np.int64)  # per truth label: pixels predicted IGNORE_INDEX
        self.n_ignored = 0

    def update(self, pred: np.ndarray, truth: np.ndarray, *, name: str = "") -> None:
        """Add a prediction/truth pair of equal shape (any rank). Truth values >= n_labels are ignored."""
        p = np.asarray(pred).astype(np.int64, copy=False).ravel()
        t = np.asarray(truth).astype(np.int64, copy=False).ravel()
        if np.shape(pred) != np.shape(truth):
            raise MetricsError(
                f"{name or 'mask'}: prediction shape {np.shape(pred)} != truth shape {np.shape(truth)}"
            )
        keep = (t >= 0) & (t < self.n)
        self.n_ignored += int(t.size - keep.sum())
        p, t = p[keep], t[keep]
        unsure = p == IGNORE_INDEX
        if unsure.any():
            self.abstained += np.bincount(t[unsure], minlength=self.n)
            p, t = p[~unsure], t[~unsure]
        if p.size and (p.min() < 0 or p.max() >= self.n):
            raise MetricsError(
                f"{name or 'prediction'}: values must lie in 0..{self.n - 1}, got {p.min()}..{p.max()}"
            )
        self.mat += np.bincount(t * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another (e.g. another worker's) matrix in place."""
        if other.n != self.n:
            raise MetricsError(f"cannot merge a {other.n}-label matrix into a {self.n}-label one")
        self.mat += other.mat
        self.abstained += other.abstained
        self.n_ignored += other.n_ignored
        return self

    def compute(self, *, ignore_background: bool, classes: Sequence[int] | None = None) -> dict:
        return scores_from_confusion(
            self.mat, ignore_background=ignore_background, classes=classes, abstained=self.abstained
        )


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def scores_from_confusion(
    mat: np.ndarray,
    *,
    ignore_background: bool,
    classes: Sequence[int] | None = None,
    abstained: np.ndarray | None = None,
) -> dict:
    """mIoU, FwIoU, Dice (per class + mean), pixel accuracy from a confusion matrix (see module doc).

    ``abstained[t]``: pixels of truth ``t`` predicted ``IGNORE_INDEX``. A mask that declines to decide
    must not score better than one that guesses, so they count as misses of their true class (in its
    row and the total, in no column).
    """
    h = np.array(mat, dtype=np.float64)
    n = h.shape[0]
    classes = list(range(1, n)) if classes is None else [int(c) for c in classes]
    if any(c < 0 or c >= n for c in classes):
        raise MetricsError(f"classes {classes} outside 0..{n - 1}")
    a = np.zeros(n) if abstained is None else np.array(abstained, dtype=np.float64)
    if ignore_background:
        h[0, :] = 0
        a[0] = 0
    total = h.sum() + a.sum()
    rows, cols, tp = h.sum(1) + a, h.sum(0), np.diag(h)
    iou, dice, acc = [], [], []
    for c in classes:
        denom = rows[c] + cols[c] - tp[c]
        iou.append(float(tp[c] / denom) if denom > 0 else math.nan)
        dice.append(float(2 * tp[c] / (rows[c] + cols[c])) if rows[c] + cols[c] > 0 else math.nan)
        acc.append(float(tp[c] / rows[c]) if rows[c] > 0 else math.nan)
    fwiou = sum(
        rows[c] / total * i for c, i in zip(classes, iou, strict=True) if rows[c] > 0 and not math.isnan(i)
    )
    return {
        "miou": _nanmean(iou),
        "fwiou": float(fwiou) if total > 0 else math.nan,
        "mdice": _nanmean(dice),
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_class_acc": _nanmean(acc),
        "iou": iou,
        "dice": dice,
        "classes": classes,
        "ignore_background": bool(ignore_background),
        "n_pixels": int(total),
        "n_abstained_pixels": int(a.sum()),
    }


def band_width(height: int, width: int, ratio: float = 0.02) -> int:
    """Boundary band d = max(1, round(ratio * diagonal)); 6 px for 224 x 224."""
    return max(1, round(ratio * math.sqrt(height**2 + width**2)))


def boundary_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Inner boundary band of a binary mask: mask minus its d-fold 3x3 erosion after a zero pad of 1."""
    m = np.asarray(mask).astype(np.uint8)
    h, w = m.shape
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return (m - eroded).astype(bool)


class SegmentationMeter:
    """Confusion matrix + boundary IoU accumulators for one split of N tissue classes (+ background 0)."""

    def __init__(
        self,
        n_classes: int,
        *,
        ignore_background: bool,
        classes: Sequence[int] | None = None,
        boundary: bool = True,
        boundary_ratio: float = 0.02,
    ) -> None:
        self.n_classes = int(n_classes)
        self.ignore_background = bool(ignore_background)
        self.classes = list(range(1, self.n_classes + 1)) if classes is None else list(classes)
        self.cm = ConfusionMatrix(self.n_classes + 1)
        self.boundary = boundary
        self.boundary_ratio = boundary_ratio
        self.b_inter = np.zeros(self.n_classes + 1, dtype=np.int64)
        self.b_union = np.zeros(self.n_classes + 1, dtype=np.int64)
        self.band_widths: set[int] = set()
        self.n_images = 0

    def update(self, pred: np.ndarray, truth: np.ndarray, *, name: str = "") -> None:
        """Add one [H,W] pair or a [B,H,W] batch."""
        pred, truth = np.asarray(pred), np.asarray(truth)
        if pred.shape != truth.shape:
            raise MetricsError(
                f"{name or 'mask'}: prediction shape {pred.shape} != truth shape {truth.shape}"
            )
        if pred.ndim == 2:
            pred, truth = pred[None], truth[None]
        if pred.ndim != 3:
            raise MetricsError(f"{name or 'mask'}: expected [H,W] or [B,H,W], got shape {pred.shape}")
        for p, t in zip(pred, truth, strict=True):
            self.cm.update(p, t, name=name)
            self.n_images += 1
            if self.boundary:
                self._update_boundary(p, t)

    def _update_boundary(self, p: np.ndarray, t: np.ndarray) -> None:
        d = band_width(*t.shape, ratio=self.boundary_ratio)
        self.band_widths.add(d)
        valid = t <= self.n_classes
        if self.ignore_background:
            valid &= t != 0
        for c in range(self.n_classes + 1):
            gt, pr = t == c, p == c
            if not gt.any() and not pr.any():
                continue
            gb, pb = boundary_band(gt, d), boundary_band(pr, d)
            self.b_inter[c] += int((gb & pb & valid).sum())
            self.b_union[c] += int(((gb | pb) & valid).sum())

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        self.cm.merge(other.cm)
        self.b_inter += other.b_inter
        self.b_union += other.b_union
        self.band_widths |= other.band_widths
        self.n_images += other.n_images
        return self

    def compute(self) -> dict:
        out = self.cm.compute(ignore_background=self.ignore_background, classes=self.classes)
        if self.boundary:
            biou = [
                float(self.b_inter[c] / self.b_union[c]) if self.b_union[c] > 0 else math.nan
                for c in self.classes
            ]
            out["biou"] = biou
            out["mbiou"] = _nanmean(biou)
            widths = sorted(self.band_widths)
            out["boundary_band_px"] = widths[0] if len(widths) == 1 else widths
            out["boundary_ratio"] = self.boundary_ratio
            out["boundary_accumulation"] = "global"
        out["n_images"] = self.n_images
        out["n_ignored_pixels"] = self.cm.n_ignored
        return out


def mask_stem(name: str) -> str:
    """``a.png`` / ``a.png.png`` (PBIP's double extension) / ``a.mask.tif`` -> ``a``."""
    stem = name
    changed = True
    while changed:
        changed = False
        for suf in MASK_SUFFIXES:
            if stem.lower().endswith(suf) and len(stem) > len(suf):
                stem = stem[: -len(suf)]
                changed = True
                break
    return stem


def read_mask(path: str | Path) -> np.ndarray:
    """Index mask of a PNG (palettised or greyscale) or level 0 of a (pyramidal) TIFF."""
    p = Path(path)
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tf:
                arr = tf.series[0].levels[0].asarray()
        else:
            from PIL import Image

            with Image.open(p) as im:
                if im.mode not in ("P", "L", "I", "I;16"):
                    raise MetricsError(
                        f"{p}: mask must be palettised or single-channel, got PIL mode {im.mode}"
                    )
                arr = np.array(im)
    except MetricsError:
        raise
    except Exception as e:
        raise MetricsError(f"could not read mask {p}: {type(e).__name__}: {e}") from e
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise MetricsError(f"{p}: mask must be 2-D, got shape {arr.shape}")
    return arr


def same_frame(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two ``(h, w)`` masks can be one image's frame at two scales.

    A mask written at the model's µm/px rounds each side of the image to whole pixels, so the smaller
    mask's aspect ratio may be off by one pixel on either side; a truth outside that is not a rescaled
    copy (another image's, or cropped), and resizing it onto the mask would score misaligned pixels.
    """
    (hs, ws), (hl, wl) = sorted((a[:2], b[:2]), key=lambda s: s[0] * s[1])
    eps = 1e-9
    return (hs - 1) / (ws + 1) - eps <= hl / wl <= (hs + 1) / max(ws - 1, eps) + eps


def fit_truth(truth: np.ndarray, shape: tuple[int, ...], truth_path: Path, pred_path: Path) -> np.ndarray:
    """The truth mask at the prediction's size (nearest), when it is the same frame at another µm/px.

    ``segment`` writes masks at the model's µm/px, so a truth drawn on the full-resolution image is
    larger by that factor; a truth of another aspect ratio is another image (or cropped, or padded) and
    is a MetricsError naming both files. ``evaluate`` and the segment stage's scorer share this rule.
    """
    if truth.shape == tuple(shape):
        return truth
    if not same_frame(truth.shape, tuple(shape)):
        raise MetricsError(
            f"{truth_path}: truth shape {truth.shape} does not frame the same image as the mask {pred_path} "
            f"shape {tuple(shape)} (another aspect ratio, not just another scale); is it another image's "
            "truth, or cropped or padded?"
        )
    return cv2.resize(truth, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def index_mask_dir(d: Path) -> dict[str, Path]:
    """Mask files of a folder by stem (see :func:`mask_stem`); two files with one stem are an error.

    ``segment``'s overlays are skipped, so its output folder can be scored as it is.
    """
    if not d.is_dir():
        raise MetricsError(f"mask directory not found: {d}")
    out: dict[str, Path] = {}
    for f in sorted(d.iterdir()):
        name = f.name.lower()
        if f.is_file() and name.endswith(MASK_SUFFIXES) and not name.endswith(NOT_MASK_SUFFIXES):
            stem = mask_stem(f.name)
            if stem in out:
                raise MetricsError(f"{d}: two masks share the stem {stem!r}: {out[stem].name}, {f.name}")
            out[stem] = f
    return out


def evaluate_dirs(
    pred_dir: str | Path,
    truth_dir: str | Path,
    n_classes: int,
    ignore_background: bool,
    *,
    classes: Sequence[int] | None = None,
    truth_lut: Sequence[int] | None = None,
    pred_lut: Sequence[int] | None = None,
    boundary: bool = True,
    allow_unmatched: bool = False,
) -> dict:
    """Score every prediction in ``pred_dir`` against the truth mask with the same stem in ``truth_dir``.

    ``n_classes`` = tissue classes N (masks hold 0..N). ``truth_lut``/``pred_lut`` remap raw values first
    (e.g. GlaS truth {0: non-gland, 1: gland} -> ``[2, 1]``). Unpaired names are an error listing them,
    unless ``allow_unmatched`` (then they are listed in the result). Truths without a prediction are only
    listed (``unmatched_truth``): a truth folder usually holds more than one split (GlaS: train and testA).
    """
    preds, truths = index_mask_dir(Path(pred_dir)), index_mask_dir(Path(truth_dir))
    only_pred = sorted(set(preds) - set(truths))
    only_truth = sorted(set(truths) - set(preds))
    if only_pred and not allow_unmatched:
        raise MetricsError(
            f"unpaired masks: {len(only_pred)} predictions without truth {only_pred[:10]} "
            f"(pred_dir={pred_dir}, truth_dir={truth_dir})"
        )
    meter = SegmentationMeter(
        n_classes, ignore_background=ignore_background, classes=classes, boundary=boundary
    )
    luts = [None if lut is None else np.asarray(lut, dtype=np.int64) for lut in (pred_lut, truth_lut)]
    stems = sorted(set(preds) & set(truths))
    if not stems:
        raise MetricsError(f"no paired masks between {pred_dir} and {truth_dir}")
    for stem in stems:
        p, t = read_mask(preds[stem]), read_mask(truths[stem])
        for i, lut in enumerate(luts):
            if lut is None:
                continue
            arr = p if i == 0 else t
            if arr.max() >= len(lut):
                raise MetricsError(
                    f"{(preds if i == 0 else truths)[stem]}: value {arr.max()} outside the LUT of {len(lut)}"
                )
            if i == 0:
                p = lut[p]
            else:
                t = lut[t]
        t = fit_truth(t, p.shape, truths[stem], preds[stem])
        meter.update(p, t, name=str(preds[stem]))
    out = meter.compute()
    out["n_pairs"] = len(stems)
    out["unmatched_pred"] = only_pred
    out["unmatched_truth"] = only_truth
    return out
