"""Scoring the stages' outputs against truth that lives outside the run: GlaS-style PNG masks with a LUT
(segment stage) and a patch dataset's masks cropped at each tile (pseudo stage)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pbip_engine.engine.inference.cohort import score_slide_mask
from pbip_engine.engine.metrics import MetricsError
from pbip_engine.engine.pseudo.scoring import patch_truth, score_pseudo


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    return path


def test_slide_mask_vs_raw_truth_through_the_lut(tmp_path):
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    raw = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # GlaS raw: 1 gland, 0 non-gland
    p, t = _png(tmp_path / "a.png", pred), _png(tmp_path / "t" / "a.png", raw)
    res = score_slide_mask(p, t, 2, truth_lut=[2, 1]).compute()
    # gland (1): pred 4 px, truth 5 px, overlap 4 -> 4/5; non-gland (2): pred 4, truth 3, overlap 3 -> 3/4
    assert res["iou"] == pytest.approx([4 / 5, 3 / 4])  # classes 1, 2
    assert res["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    with pytest.raises(MetricsError, match=r"t/a\.png.*truth_lut"):
        score_slide_mask(p, _png(tmp_path / "t" / "a.png", raw + 2), 2, truth_lut=[2, 1])


def test_slide_mask_vs_larger_truth_is_resampled(tmp_path):
    pred = np.array([[1, 2], [2, 2]])
    truth = np.kron(pred, np.ones((4, 4), dtype=int))  # same frame, 4x finer
    res = score_slide_mask(_png(tmp_path / "p.png", pred), _png(tmp_path / "t.png", truth), 2).compute()
    assert res["miou"] == pytest.approx(1.0)


def test_pseudo_masks_scored_against_patch_dataset_masks(tmp_path):
    root = tmp_path / "glas"
    raw = np.zeros((8, 12), np.uint8)
    raw[:, :6] = 1  # left half gland
    _png(root / "masks" / "train_1.png", raw)
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(tmp_path / "x.jpg")
    (root / "images").mkdir()
    (tmp_path / "x.jpg").rename(root / "images" / "train_1.jpg")
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["name", "split"], ["train_1", "train"]])

    out = tmp_path / "pseudo"
    # two 4-px tiles: one exactly right, one predicting gland over a non-gland/gland mix
    _png(out / "masks/train_1/0_0.png", np.ones((4, 4)))
    _png(out / "masks/train_1/4_4.png", np.ones((4, 4)))
    index = [
        {
            "slide_id": "train_1",
            "x": 0,
            "y": 0,
            "size0": 4,
            "mask_path": "masks/train_1/0_0.png",
            "labels": [1, 0],
        },
        {
            "slide_id": "train_1",
            "x": 4,
            "y": 4,
            "size0": 4,
            "mask_path": "masks/train_1/4_4.png",
            "labels": [1, 1],
        },
        {"slide_id": "elsewhere", "x": 0, "y": 0, "size0": 4, "mask_path": "masks/train_1/0_0.png"},
    ]
    truth_for = patch_truth("glas", str(root))
    assert truth_for is not None and truth_for("elsewhere") is None
    res = score_pseudo(index, out, truth_for, 2)
    # tile 2 covers x 4..7: columns 4,5 gland (8 px), 6,7 non-gland (8 px), all predicted gland
    assert res["n_images"] == 2
    assert res["iou"] == pytest.approx([24 / 32, 0.0])
    # the multi-label breakdown holds tile 2 alone: 8 gland px right, 8 non-gland px called gland
    assert res["multi_label"]["n_images"] == 1
    assert res["multi_label"]["iou"] == pytest.approx([8 / 16, 0.0])
