"""Image-specific prototypes (``pseudo.image_prototypes``): seeds, slide prototypes, the re-read CAMs, the stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pbip_engine.engine.pseudo.cams import UNCERTAIN
from pbip_engine.engine.pseudo.image_prototypes import (
    MIN_SEED_CELLS,
    image_prototype_cams,
    seed_masks,
    slide_prototypes,
)
from pbip_engine.engine.pseudo.stitch import (
    decode_arrays,
    encode_arrays,
    encode_cam,
    stitched_masks,
    stitched_masks_and_margins,
)


def test_seeds_are_label_settled_pixels_and_the_surest_cam_decisions():
    mask = np.array([[1, 1, 2, 2, 0, UNCERTAIN]], np.uint8)
    margin = np.array([[np.inf, 0.1, 0.9, 0.5, np.inf, np.inf]], np.float32)
    np.testing.assert_array_equal(seed_masks([mask], [margin], 0.0)[0], [[1, 0, 0, 0, 0, 0]])
    # the surest half of the three CAM-decided pixels: margins 0.9 and 0.5 (the median and above)
    np.testing.assert_array_equal(seed_masks([mask], [margin], 0.5)[0], [[1, 0, 2, 2, 0, 0]])
    np.testing.assert_array_equal(seed_masks([mask], [margin], 1.0)[0], [[1, 1, 2, 2, 0, 0]])


def _two_feature_tile() -> tuple[np.ndarray, np.ndarray]:
    """An 8-px tile whose features (4x4 cells) are e0 on the left half and e1 on the right half; its CAMs
    call the left half class 1 surely, columns 4-5 class 2 surely, and columns 6-7 class 1 narrowly: the
    surest 70 % of these CAM-decided pixels are the first six columns."""
    feat = np.zeros((3, 4, 4), np.float32)
    feat[0, :, :2], feat[1, :, 2:] = 1.0, 1.0
    return _column_cam({4: 0.95, 6: 0.2, 8: 0.55}), feat


def test_prototypes_of_the_slide_overrule_a_narrow_cam_decision_its_features_contradict():
    cam, feat = _two_feature_tile()
    tile = ([0], [0], [8])
    labels = np.array([[1, 1]], np.float32)
    before, margins = stitched_masks_and_margins(*tile, [cam], labels)
    assert (before[0][:, 6:] == 1).all()  # the narrow, wrong call
    protos = slide_prototypes([[feat]], seed_masks(before, margins, 0.7), [1, 2], 2)
    np.testing.assert_allclose(protos[0][:, 0], [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    cams, changed = image_prototype_cams([cam], [[feat]], [10.0], before, margins, labels, 0.7, 1.0)
    after = stitched_masks(*tile, cams, labels)
    assert changed
    assert (after[0][:, :4] == 1).all() and (after[0][:, 4:] == 2).all()
    # a weight below 1 mixes: the cohort CAM still counts, and the sure calls stay
    mixed, _ = image_prototype_cams([cam], [[feat]], [10.0], before, margins, labels, 0.7, 0.5)
    np.testing.assert_allclose(mixed[0], 0.5 * cam + 0.5 * cams[0], atol=1e-6)


def _column_cam(spans: dict[int, float]) -> np.ndarray:
    """An 8-px tile's two-class CAM in vertical bands: ``{end column: class-1 score}``, class 2 the rest."""
    cam = np.zeros((2, 8, 8), np.float32)
    start = 0
    for end, p in spans.items():
        cam[0, :, start:end], cam[1, :, start:end] = p, 1.0 - p
        start = end
    return cam


def _two_mode_tile() -> tuple[np.ndarray, np.ndarray]:
    """An 8-px tile whose class 2 has two looks. Its CAMs call columns 0-1 class 1 surely, columns 2-5 class 2
    less surely, and columns 6-7 class 1 narrowly (the surest 70 %: the first six columns). Feature columns
    (2 px each): e0; e1 = (0.8, 0.6, 0); e2 = (-0.8, 0.6, 0); e1 again. Class 2's one mean is (0, 1, 0), at
    cosine 0.6 to e1, while class 1's prototype e0 is at 0.8: only a prototype per look puts the last
    columns, e1 like columns 2-3, in class 2."""
    feat = np.zeros((3, 4, 4), np.float32)
    feat[0, :, 0] = 1.0
    feat[:2, :, 1], feat[:2, :, 2], feat[:2, :, 3] = [[0.8], [0.6]], [[-0.8], [0.6]], [[0.8], [0.6]]
    return _column_cam({2: 0.95, 6: 0.2, 8: 0.55}), feat


def test_a_class_with_two_looks_gets_a_prototype_for_each():
    cam, feat = _two_mode_tile()
    tile, labels = ([0], [0], [8]), np.array([[1, 1]], np.float32)
    before, margins = stitched_masks_and_margins(*tile, [cam], labels)
    seeds = seed_masks(before, margins, 0.7)
    assert (seeds[0][:, :2] == 1).all() and (seeds[0][:, 2:6] == 2).all() and (seeds[0][:, 6:] == 0).all()
    one = slide_prototypes([[feat]], seeds, [1, 2], 2)
    np.testing.assert_allclose(one[0][1, 0], [0, 1, 0], atol=1e-6)  # the mean of the two looks
    two = slide_prototypes([[feat]], seeds, [1, 2], 2, k=2)
    assert two[0].shape == (2, 2, 3)
    looks = sorted(two[0][1].round(4).tolist())
    np.testing.assert_allclose(looks, [[-0.8, 0.6, 0], [0.8, 0.6, 0]], atol=1e-4)
    np.testing.assert_allclose(two[0][0], [[1, 0, 0], [1, 0, 0]], atol=1e-6)  # one look: its centre twice
    for k, right in ((1, 1), (2, 2)):
        cams, changed = image_prototype_cams([cam], [[feat]], [10.0], before, margins, labels, 0.7, 1.0, k)
        after = stitched_masks(*tile, cams, labels)
        assert changed and (after[0][:, :2] == 1).all() and (after[0][:, 7] == right).all(), k
    # more looks asked for than the seeds carry (8 cells of class 2 < 3 * MIN_SEED_CELLS): fewer centres
    three = slide_prototypes([[feat]], seeds, [1, 2], 2, k=3)
    assert three[0].shape == (2, 3, 3) and len({tuple(v) for v in three[0][1].round(4).tolist()}) == 2


def test_a_listed_class_without_enough_seeds_keeps_the_cohort_cams():
    cam, feat = _two_feature_tile()
    tile, labels = ([0], [0], [8]), np.array([[1, 1]], np.float32)
    before, margins = stitched_masks_and_margins(*tile, [cam], labels)
    # no fraction: every pixel is CAM-decided, so neither class has a seed
    cams, changed = image_prototype_cams([cam], [[feat]], [10.0], before, margins, labels, 0.0, 1.0)
    assert not changed and cams[0] is cam
    seeds = [np.zeros((8, 8), np.uint8)]
    seeds[0][0, 0] = 1  # one cell of class 1 (< MIN_SEED_CELLS), and class 2 none
    assert MIN_SEED_CELLS > 1 and slide_prototypes([[feat]], seeds, [1, 2], 2) is None


def test_feature_blobs_round_trip():
    arrays = [np.random.default_rng(0).random((3, 4, 4)).astype(np.float16), np.array([1.5, 2.0], np.float32)]
    back = decode_arrays(encode_arrays(arrays))
    assert len(back) == 2 and all(
        np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, back, strict=True)
    )


class _FeatureCams(torch.nn.Module):
    """Two levels of features (the image itself, and its 2x-pooled copy) and CAMs from them."""

    def forward(self, x: torch.Tensor) -> dict:
        f0, f1 = x, torch.nn.functional.avg_pool2d(x, 2)
        cams = [torch.cat([f[:, :1] + 1, f[:, 2:3] + 1], 1) for f in (f0, f1)]
        return {"cams": cams, "logits": [c.mean((2, 3)) for c in cams], "features": [f0, f1],
                "scales": torch.tensor([2.0, 4.0])}  # fmt: skip


def test_pbip_features_come_with_the_same_cams_and_level_weights():
    from pbip_engine.methods.pbip.cams import predict_cams, predict_cams_and_features
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    cfg = ClassNetConfig(
        pretrained=False, amp=False, levels=(1, 2), eval_fuse_weights=(1.0, 3.0), cam_readout="raw"
    )
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
        "labels": np.ones((2, 2), np.float32),
    }
    model = _FeatureCams()
    cams, feats, weights = predict_cams_and_features(model, batch, cfg, "cpu", flip=True)
    torch.testing.assert_close(cams, predict_cams(model, batch, cfg, "cpu", flip=True))
    assert [tuple(f.shape) for f in feats] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    torch.testing.assert_close(feats[0].norm(dim=1), torch.ones(2, 8, 8))
    assert weights == pytest.approx([0.25 * 2.0, 0.75 * 4.0])
    # a level the read-out leaves out has no features and no weight
    cfg.eval_fuse_weights = (0.0, 1.0)
    _, feats, weights = predict_cams_and_features(model, batch, cfg, "cpu")
    assert len(feats) == 1 and feats[0].shape[-1] == 4 and weights == pytest.approx([4.0])


def test_the_stage_re_reads_a_slide_and_the_spec_checks_the_key(tmp_path, monkeypatch):
    from PIL import Image

    from pbip_engine.engine.ingest.tile_slide import encode_jpeg
    from pbip_engine.jobs.pseudo import stitch_slide
    from pbip_engine.methods import get_method
    from pbip_engine.schemas.spec import SpecError, check_inputs, parse_spec

    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}],
    }
    cam, feat = _two_feature_tile()
    batch = {
        "tile_id": np.array(["s:0_0"], dtype=object), "slide_id": np.array(["s"], dtype=object),
        "x": np.array([0]), "y": np.array([0]), "size0": np.array([8]), "labels": np.array([[1, 1]], np.uint8),
        "image": np.array([encode_jpeg(np.full((8, 8, 3), 120, np.uint8), 90)], dtype=object),
        "cam": np.array([encode_cam(cam)], dtype=object),
        "features": np.array([encode_arrays([feat.astype(np.float16), np.array([10.0], np.float32)])], dtype=object),
    }  # fmt: skip
    for frac, right in ((0.0, 1), (0.7, 2)):
        pseudo = {"background": "none", "image_prototypes": frac, "image_prototype_weight": 1.0}
        spec = parse_spec({**raw, "pseudo": pseudo}, tmp_path)
        rows = stitch_slide(batch, spec, str(tmp_path))
        assert (np.asarray(Image.open(tmp_path / rows["mask_path"][0]))[:, 6:] == right).all()
    cam, feat = _two_mode_tile()  # pseudo.image_prototype_k reaches the stage
    batch["cam"] = np.array([encode_cam(cam)], dtype=object)
    batch["features"] = np.array(
        [encode_arrays([feat.astype(np.float16), np.array([10.0], np.float32)])], dtype=object
    )
    for k, right in ((1, 1), (2, 2)):
        pseudo = {
            "background": "none",
            "image_prototypes": 0.7,
            "image_prototype_weight": 1.0,
            "image_prototype_k": k,
        }
        rows = stitch_slide(batch, parse_spec({**raw, "pseudo": pseudo}, tmp_path), str(tmp_path))
        assert (np.asarray(Image.open(tmp_path / rows["mask_path"][0]))[:, 7] == right).all(), k
    with pytest.raises(ValueError, match=r"image_prototypes.*stitch"):
        parse_spec({**raw, "pseudo": {"image_prototypes": 0.5, "stitch": False}}, tmp_path)
    gland = parse_spec({**raw, "method": {"name": "gland"}, "pseudo": {"image_prototypes": 0.5}}, tmp_path)
    check_inputs(gland)  # gland's CAM model offers its head's features too
    monkeypatch.setattr(type(get_method("gland")), "prototype_features", False)  # a method without them
    with pytest.raises(SpecError, match=r"image_prototypes.*'gland'"):
        check_inputs(gland)


def test_the_default_is_the_methods_and_off_without_stitching(tmp_path):
    from pbip_engine.schemas.spec import parse_spec

    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}],
    }
    assert parse_spec(raw, tmp_path).pseudo.image_prototypes == 0.5  # pbip: measured to help
    gland = parse_spec({**raw, "method": {"name": "gland"}}, tmp_path)
    assert gland.pseudo.image_prototypes == 0.5  # gland: measured to help too (sessions 30-32)
    lpd = parse_spec({**raw, "method": {"name": "lpd"}}, tmp_path)
    assert lpd.pseudo.image_prototypes == 0  # lpd: measured on pseudo masks only (session 22): off by default
    assert parse_spec({**raw, "pseudo": {"stitch": False}}, tmp_path).pseudo.image_prototypes == 0
    assert parse_spec({**raw, "pseudo": {"image_prototypes": 0}}, tmp_path).pseudo.image_prototypes == 0
