"""Metrics on small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from PIL import Image

from pbip_engine.engine.metrics import (
    IGNORE_INDEX,
    ConfusionMatrix,
    MetricsError,
    SegmentationMeter,
    band_width,
    boundary_band,
    evaluate_dirs,
    mask_stem,
)

TRUTH = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 2, 2]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 1, 1, 2], [2, 2, 2, 2]])
# Confusion matrix (rows truth, cols pred):
#   truth 0 (4 px): pred 0,1,0,0       -> [3, 1, 0]
#   truth 1 (6 px): pred 1,1,1,1,1,2   -> [0, 5, 1]
#   truth 2 (6 px): pred 2,1,2,2,2,2   -> [0, 1, 5]
# Background kept: rows [4,6,6], cols [3,7,6]
#   IoU1 = 5/(6+7-5) = 5/8, IoU2 = 5/(6+6-5) = 5/7, mIoU = (5/8 + 5/7)/2
#   Dice1 = 10/13, Dice2 = 10/12, FwIoU = 6/16*5/8 + 6/16*5/7, pixel acc = 13/16
# Background ignored (row 0 dropped): rows [0,6,6], cols [0,6,6]
#   IoU1 = IoU2 = 5/7, Dice = 10/12, FwIoU = 6/12*5/7*2 = 5/7, pixel acc = 10/12


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TRUTH)
    assert cm.mat.tolist() == [[3, 1, 0], [0, 5, 1], [0, 1, 5]]


def test_scores_background_kept():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TRUTH)
    r = cm.compute(ignore_background=False)
    assert r["iou"] == pytest.approx([5 / 8, 5 / 7])
    assert r["miou"] == pytest.approx((5 / 8 + 5 / 7) / 2)
    assert r["dice"] == pytest.approx([10 / 13, 10 / 12])
    assert r["fwiou"] == pytest.approx(6 / 16 * 5 / 8 + 6 / 16 * 5 / 7)
    assert r["pixel_acc"] == pytest.approx(13 / 16)
    assert r["ignore_background"] is False and r["classes"] == [1, 2] and r["n_pixels"] == 16


def test_scores_background_ignored():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TRUTH)
    r = cm.compute(ignore_background=True)
    assert r["iou"] == pytest.approx([5 / 7, 5 / 7])
    assert r["mdice"] == pytest.approx(10 / 12)
    assert r["fwiou"] == pytest.approx(5 / 7)
    assert r["pixel_acc"] == pytest.approx(10 / 12)
    assert r["ignore_background"] is True and r["n_pixels"] == 12


def test_ignore_index_and_bad_pred():
    cm = ConfusionMatrix(3)
    cm.update(np.array([1, 1]), np.array([1, 255]))
    assert cm.mat.sum() == 1 and cm.n_ignored == 1
    with pytest.raises(MetricsError, match=r"0\.\.2"):
        cm.update(np.array([3]), np.array([1]))
    with pytest.raises(MetricsError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_absent_class_is_nan_and_skipped():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TRUTH)  # class 3 never appears
    r = cm.compute(ignore_background=False)
    assert math.isnan(r["iou"][2]) and r["miou"] == pytest.approx((5 / 8 + 5 / 7) / 2)


def test_band_width():
    assert band_width(224, 224) == 6  # round(0.02 * 316.8)
    assert band_width(4, 4) == 1  # round(0.113) = 0 -> clamped to 1
    assert band_width(775, 522) == 19  # round(0.02 * 934.4)


def test_boundary_band_ring():
    full = np.ones((224, 224), bool)
    band = boundary_band(full, 6)
    assert band.sum() == 224 * 224 - 212 * 212  # the image border counts as a boundary
    assert band[6, 6] == 0 and band[5, 100] == 1


def test_boundary_iou_hand_case():
    # 8x8, class 1 = 6x6 square rows 1-6 cols 1-6; prediction shifted one column right (cols 2-7).
    # d = max(1, round(0.02*11.3)) = 1. Truth band: square minus rows 2-5 x cols 2-5 = 20 px.
    # Pred band: square (touching the right border) minus rows 2-5 x cols 3-6 = 20 px.
    # Overlap: rows 1 and 6, cols 2-6 (5 + 5 = 10); the side columns 1,6 vs 2,7 do not meet.
    # bIoU_1 = 10 / (20 + 20 - 10) = 1/3.
    t = np.zeros((8, 8), np.uint8)
    p = np.zeros((8, 8), np.uint8)
    t[1:7, 1:7] = 1
    p[1:7, 2:8] = 1
    meter = SegmentationMeter(1, ignore_background=False)
    meter.update(p, t)
    r = meter.compute()
    assert r["boundary_band_px"] == 1 and r["boundary_accumulation"] == "global"
    assert r["biou"] == pytest.approx([1 / 3]) and r["mbiou"] == pytest.approx(1 / 3)
    # ignoring background: pred-band pixels over truth-0 (column 7 and the parts outside) are dropped:
    # pred band within truth-1 pixels = rows 1,6 cols 2-6 (10) + rows 2-5 col 2 (4) = 14; truth band 20;
    # intersection 10 -> union = 20 + 14 - 10 = 24
    m2 = SegmentationMeter(1, ignore_background=True)
    m2.update(p, t)
    assert m2.compute()["biou"] == pytest.approx([10 / 24])


def test_meter_accumulates_globally():
    m = SegmentationMeter(2, ignore_background=False, boundary=False)
    m.update(np.stack([PRED, PRED]), np.stack([TRUTH, TRUTH]))
    r = m.compute()
    assert r["n_images"] == 2 and r["n_pixels"] == 32 and r["miou"] == pytest.approx((5 / 8 + 5 / 7) / 2)
    other = SegmentationMeter(2, ignore_background=False, boundary=False)
    other.update(TRUTH, TRUTH)
    m.merge(other)
    assert m.compute()["n_pixels"] == 48


def test_mask_stem():
    assert mask_stem("a.png") == "a" and mask_stem("a.png.png") == "a" and mask_stem("s1.mask.tif") == "s1"


def _save_p(path, arr):
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.save(path)


def test_evaluate_dirs(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    _save_p(pred / "a.png", PRED)
    Image.fromarray(TRUTH.astype(np.uint8)).save(truth / "a.png")  # greyscale truth
    _save_p(pred / "b.png.png", TRUTH)
    tifffile.imwrite(truth / "b.mask.tif", TRUTH.astype(np.uint8))
    r = evaluate_dirs(pred, truth, 2, ignore_background=False)
    assert r["n_pairs"] == 2 and r["ignore_background"] is False
    # a: as above; b: perfect -> class 1: tp 5+6=11, row 12, col 7+6=13 -> IoU 11/14
    assert r["iou"][0] == pytest.approx(11 / 14)
    _save_p(pred / "c.png", PRED)
    with pytest.raises(MetricsError, match=r"predictions without truth \['c'\]"):
        evaluate_dirs(pred, truth, 2, ignore_background=False)
    r2 = evaluate_dirs(pred, truth, 2, ignore_background=True, allow_unmatched=True, truth_lut=[0, 2, 1])
    assert r2["unmatched_pred"] == ["c"] and r2["miou"] < r["miou"]
    # A truth without a prediction (a folder of train and test masks) is listed, not an error.
    (pred / "c.png").unlink()
    _save_p(truth / "d.png", TRUTH)
    r3 = evaluate_dirs(pred, truth, 2, ignore_background=False)
    assert r3["n_pairs"] == 2 and r3["unmatched_truth"] == ["d"] and r3["miou"] == r["miou"]


def test_undecided_predictions_are_misses_not_errors():
    # A pseudo mask's 255 (no decision) must neither crash the scoring nor score better than a guess.
    truth = np.array([[1, 1], [2, 2]])
    pred = np.array([[1, IGNORE_INDEX], [2, 2]])
    m = SegmentationMeter(2, ignore_background=True, boundary=False)
    m.update(pred, truth)
    r = m.compute()
    assert r["iou"] == [0.5, 1.0] and r["n_pixels"] == 4 and r["n_abstained_pixels"] == 1
    assert r["pixel_acc"] == 0.75
    other = SegmentationMeter(2, ignore_background=True, boundary=False)
    other.update(pred, truth)
    assert m.merge(other).compute()["n_abstained_pixels"] == 2
