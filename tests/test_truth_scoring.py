"""Scoring the stages' outputs against truth that lives outside the run: GlaS-style PNG masks with a LUT
(segment stage) and a patch dataset's masks cropped at each tile (pseudo stage)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
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


def test_truth_at_another_scale_scores_but_another_aspect_is_refused_naming_both(tmp_path):
    # A mask at 4x the slide's µm/px rounds each side up: 1001 x 1503 slide px -> 251 x 376 mask px.
    truth = np.zeros((1001, 1503), np.uint8)
    truth[:, 700:] = 1
    pred = cv2.resize(truth, (376, 251), interpolation=cv2.INTER_NEAREST)
    p = _png(tmp_path / "s.mask.png", pred)
    res = score_slide_mask(p, _png(tmp_path / "t" / "s.png", truth), 2).compute()
    assert res["iou"][0] == pytest.approx(1.0, abs=0.02)  # class 1 only: class 2 is absent
    small = pred[:50, 150:230]  # both classes, 50 x 80, against its truth at exactly 2x
    p2 = _png(tmp_path / "s2.mask.png", small + 1)
    t2 = _png(tmp_path / "t" / "s2.png", np.kron(small + 1, np.ones((2, 2), np.uint8)))
    assert score_slide_mask(p2, t2, 2).compute()["miou"] == pytest.approx(1.0)

    wrong = _png(tmp_path / "t" / "w.png", np.ones((500, 700), np.uint8))  # another frame: 500 x 700
    sq = _png(tmp_path / "w.mask.png", np.ones((512, 512), np.uint8))
    with pytest.raises(MetricsError) as ei:
        score_slide_mask(sq, wrong, 2)
    msg = str(ei.value)
    assert str(wrong) in msg and str(sq) in msg and "(500, 700)" in msg and "(512, 512)" in msg
    assert "aspect ratio" in msg and "\n" not in msg


def test_a_bad_truth_fails_its_slide_not_the_segment_stage_also_when_resumed(tmp_path, monkeypatch):
    """A slide resumed as done is scored again on a re-run: its bad truth must not raise out of the stage."""
    import json

    import tifffile
    import yaml

    import pbip_engine.jobs.infer as infer
    from pbip_engine.jobs.stage import StageContext
    from pbip_engine.schemas.spec import load_spec

    truth = tmp_path / "truth"
    _png(truth / "good.png", np.ones((64, 64)))
    _png(truth / "wrong.png", np.ones((40, 70)))  # another aspect ratio than its 32 x 32 mask
    (truth / "broken.png").write_bytes(b"\x89PNG not really")  # unreadable in the old code too
    for n in ("good", "wrong", "broken"):
        (tmp_path / "in" / f"{n}.tif").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{n}.tif").write_bytes(b"")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "run": {"name": "t", "output": str(tmp_path / "out")},
        "data": {"synthetic": {"slides": 1, "size": 512}},
        "classes": [{"name": "a", "color": [255, 0, 0]}, {"name": "b", "color": [0, 255, 0]}],
        "segment": {"slides": [str(tmp_path / "in" / "*.tif")], "truth": str(truth)},
    }))  # fmt: skip
    spec = load_spec(spec_path)
    work = tmp_path / "work"
    (tmp_path / "out" / "segmenter").mkdir(parents=True)
    (work / "state").mkdir(parents=True)
    (work / "masks").mkdir()
    for n in ("good", "wrong", "broken"):  # every slide written by an earlier, interrupted run
        tifffile.imwrite(work / "masks" / f"{n}.mask.ome.tif", np.ones((32, 32), np.uint8))
        (work / "state" / f"{n}.json").write_text(json.dumps({"status": "done", "tissue_mpix": 1.0}))
    monkeypatch.setattr(infer, "read_model_card", lambda p: {"mpp": 2.0})
    monkeypatch.setattr(infer, "check_model_loads", lambda p: None)
    monkeypatch.setattr(infer, "segment_slides", lambda todo, *a, **kw: iter(()))
    monkeypatch.setattr(StageContext, "ray", lambda self, **kw: None)
    logs: list[str] = []
    ctx = StageContext(spec=spec, output=tmp_path / "out", work_dir=work, address=None, log=logs.append,
                       progress=False)  # fmt: skip
    res = infer.SegmentStage().run(ctx)
    assert res.units["good"]["status"] == "done" and res.units["good"]["metrics"]["miou"] == 1.0
    for n in ("wrong", "broken"):
        assert res.units[n]["status"] == "failed" and str(truth / f"{n}.png") in res.units[n]["reason"]
        assert any(line.startswith(f"[segment] {n} FAILED: scoring:") for line in logs), logs
    assert json.loads((work / "metrics.json").read_text())["n_images"] == 1
