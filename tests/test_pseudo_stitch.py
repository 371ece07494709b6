"""Pseudo masks from CAMs stitched across overlapping tiles (issue 15, item 3): one label per pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pbip_engine.engine.pseudo.cams import CamError, cams_to_mask
from pbip_engine.engine.pseudo.stitch import (
    decision_margins,
    decode_cam,
    encode_cam,
    fill_enclosed,
    least_certain,
    listed_by_all,
    masks_as_votes,
    shared_labels,
    stitch_cams,
    stitched_masks,
    stitched_masks_and_margins,
)


def _disagreeing_pair() -> tuple[list[int], list[int], list[int], list[np.ndarray], np.ndarray]:
    """Two 8-px tiles at x = 0 and x = 4 (stride 4): in the overlap (cols 4..7) tile A says class 1, B class 2."""
    a = np.zeros((2, 8, 8), np.float32)
    a[0, :, :] = 0.6  # A: class 1 everywhere, weakly
    a[1, :, :] = 0.2
    b = np.zeros((2, 8, 8), np.float32)
    b[0, :, :] = 0.1
    b[1, :, :] = 0.9  # B: class 2 everywhere, strongly
    return [0, 4], [0, 0], [8, 8], [a, b], np.ones((2, 2), np.float32)


def test_overlap_gets_one_label_from_every_tile():
    xs, ys, s0, cams, labels = _disagreeing_pair()
    per_tile = cams_to_mask(np.stack(cams), labels, "none")
    assert (per_tile[0][:, 4:] != per_tile[1][:, :4]).all()  # the old path: two labels for the same pixels
    a, b = stitched_masks(xs, ys, s0, cams, labels, "none")
    assert a.shape == b.shape == (8, 8) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[:, 4:], b[:, :4])
    assert (a[:, 4:] == 2).all()  # mean CAM in the overlap: class 1 0.35, class 2 0.55
    assert (a[:, :4] == 1).all() and (b[:, 4:] == 2).all()  # outside the overlap each tile keeps its own


def test_overlap_at_a_coarser_tile_scale_and_in_two_dimensions():
    """Level-0 positions at twice the tile's pixel scale (size0 16, 8-px CAMs), four tiles around a corner."""
    rng = np.random.default_rng(0)
    cams = [rng.random((3, 8, 8)).astype(np.float32) for _ in range(4)]
    xs, ys = [100, 108, 100, 108], [40, 40, 48, 48]
    labels = np.ones((4, 3), np.float32)
    masks = stitched_masks(xs, ys, [16] * 4, cams, labels, "none")
    canvas = {}
    for m, x, y in zip(masks, xs, ys, strict=True):
        for r in range(8):
            for c in range(8):
                canvas.setdefault(((y - 40) // 2 + r, (x - 100) // 2 + c), set()).add(int(m[r, c]))
    assert len(canvas) == 12 * 12 and all(len(v) == 1 for v in canvas.values())


def test_a_class_absent_from_a_tile_never_appears_in_its_mask():
    xs, ys, s0, cams, _ = _disagreeing_pair()
    labels = np.array([[1, 0], [1, 1]], np.float32)  # A has no class 2, B's strong class 2 spills over
    a, b = stitched_masks(xs, ys, s0, cams, labels, "none", overlap_labels="own")
    assert set(np.unique(a)) == {1}
    # B's overlap averages with A's zeroed class 2: class 1 (0.6+0.1)/2 = 0.35 vs class 2 0.9/2 = 0.45
    assert (b[:, :4] == 2).all()
    none = stitched_masks(xs, ys, s0, cams, np.array([[0, 0], [0, 1]], np.float32), "none")
    assert none[0].max() == 0 and set(np.unique(none[1])) == {2}  # unlabelled tile -> all background


def test_a_single_label_neighbour_settles_the_overlap():
    """A lists class 1 only, so every pixel of A is class 1, in B's mask too (the default ``intersect``)."""
    xs, ys, s0, cams, _ = _disagreeing_pair()
    labels = np.array([[1, 0], [1, 1]], np.float32)
    a, b = stitched_masks(xs, ys, s0, cams, labels, "none")
    assert (a == 1).all()
    assert (b[:, :4] == 1).all()  # B's CAM says 2 there (0.45 vs 0.35), but A's label rules 2 out
    assert (b[:, 4:] == 2).all()  # outside A, B's own labels and CAMs decide
    np.testing.assert_array_equal(a[:, 4:], b[:, :4])  # one label per pixel, as the regions assume
    # the same under a method without CAMs (mask votes) and with the power background rule
    votes = list(masks_as_votes(np.array([np.full((8, 8), 1), np.full((8, 8), 2)], np.uint8), 2))
    _, vb = stitched_masks(xs, ys, s0, votes, labels, "power", power=2.0)
    assert (vb[:, :4] == 1).all() and (vb[:, 4:] == 2).all()


def test_contradictory_overlap_labels_fall_back_to_each_tiles_own():
    """A says only 1, B only 2: the overlap can satisfy neither, so each tile keeps its own label there."""
    xs, ys, s0, cams, _ = _disagreeing_pair()
    labels = np.array([[1, 0], [0, 1]], np.float32)
    a, b = stitched_masks(xs, ys, s0, cams, labels, "none")
    assert (a == 1).all() and (b == 2).all()


def test_shared_labels_on_a_coarser_grid_around_a_corner():
    """Four 16-px (level 0) tiles at stride 8 with 8-px CAMs; the top-left tile is single-label."""
    xs, ys = [0, 8, 0, 8], [0, 0, 8, 8]
    labels = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]], np.float32)
    ok = shared_labels(xs, ys, [16] * 4, [8] * 4, labels)
    assert [o.shape for o in ok] == [(3, 8, 8)] * 4 and all(o.dtype == bool for o in ok)
    # the shared 4x4 centre (level 0 8..16) is under all four tiles: only class 1 is listed by all
    for o, (r, c) in zip(ok, [(4, 4), (4, 0), (0, 4), (0, 0)], strict=True):
        assert (o[:, r : r + 4, c : c + 4] == np.array([1, 0, 0], bool)[:, None, None]).all()
    # the last tile's own corner (under it alone) keeps all three of its classes
    assert ok[3][:, 4:, 4:].all()
    # its right edge strip over rows 0..3 is shared with tile 1 (classes 1, 2) only
    assert (ok[3][:, :4, 4:] == np.array([1, 1, 0], bool)[:, None, None]).all()
    rng = np.random.default_rng(4)
    cams = [rng.random((3, 8, 8)).astype(np.float32) for _ in range(4)]
    for m, o in zip(stitched_masks(xs, ys, [16] * 4, cams, labels, "none"), ok, strict=True):
        assert np.take_along_axis(o, (m[None].astype(np.int64) - 1), 0).all()  # every label allowed
    # a tile twice as coarse (size0 32, also 8-px CAMs) over all four: its pixels at the single-label
    # tile's area allow class 1 only, its own far corner all three classes; an unlabelled tile changes nothing
    big = shared_labels([*xs, 0, 0], [*ys, 0, 0], [16] * 4 + [32, 16], [8] * 6,
                        np.concatenate([labels, [[1, 1, 1], [0, 0, 0]]]))  # fmt: skip
    assert (big[4][:, :4, :4] == np.array([1, 0, 0], bool)[:, None, None]).all()
    assert big[4][:, 6:, 6:].all()
    for a, b in zip(big[:4], ok, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CamError, match="overlap_labels"):
        stitched_masks(xs, ys, [16] * 4, cams, labels, "none", overlap_labels="union")
    with pytest.raises(CamError, match="allowed"):
        cams_to_mask(np.stack(cams), labels, "none", allowed=np.ones((4, 3, 4, 4), bool))


def test_background_rules_still_apply():
    xs, ys, s0, cams, labels = _disagreeing_pair()
    rgbs = [np.full((8, 8, 3), 120, np.uint8) for _ in range(2)]
    rgbs[1][:, 6:] = 250  # glass in B's right quarter (outside the overlap)
    a, b = stitched_masks(xs, ys, s0, cams, labels, "white", rgbs, min_size=4)
    assert (b[:, 6:] == 0).all() and (b[:, :6] > 0).all() and (a > 0).all()
    _, b_none = stitched_masks(xs, ys, s0, cams, labels, "none", rgbs)
    assert (b_none > 0).all()
    weak = [c * 0.1 for c in cams]  # low CAMs everywhere: the power rule's background wins
    assert all((m == 0).all() for m in stitched_masks(xs, ys, s0, weak, labels, "power", power=2.0))
    with pytest.raises(CamError, match="RGB"):
        stitched_masks(xs, ys, s0, cams, labels, "white")


def test_stitch_without_overlap_is_the_per_tile_path():
    rng = np.random.default_rng(1)
    cams = [rng.random((3, 8, 8)).astype(np.float32) for _ in range(2)]
    labels = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    stitched = stitch_cams([0, 8], [0, 0], [8, 8], cams, labels)
    for s, c, lab in zip(stitched, cams, labels, strict=True):
        np.testing.assert_allclose(s, c * lab[:, None, None])
    masks = stitched_masks([0, 8], [0, 0], [8, 8], cams, labels, "none")
    np.testing.assert_array_equal(np.stack(masks), cams_to_mask(np.stack(cams), labels, "none"))


def test_a_model_without_cams_stitches_its_masks_as_votes():
    """Three tiles at stride 4 over a 16-px strip: in cols 4..7 A says 1, B says 2, C absent; B+C say 2 in 8..11."""
    masks = np.array([np.full((8, 8), 1), np.full((8, 8), 2), np.full((8, 8), 2)], np.uint8)
    masks[0][:, :2] = 0  # A's own background (e.g. glass) stays background where no other tile covers it
    votes = masks_as_votes(masks, 2)
    assert votes.shape == (3, 2, 8, 8) and votes[0, :, :, :2].max() == 0
    a, b, c = stitched_masks(
        [0, 4, 8], [0, 0, 0], [8, 8, 8], list(votes), np.ones((3, 2)), "power", power=1.0
    )
    assert (a[:, :2] == 0).all() and (a[:, 2:4] == 1).all()
    np.testing.assert_array_equal(a[:, 4:], b[:, :4])  # a 1:1 tie goes to the lowest class, in both tiles
    assert (b[:, 4:] == 2).all() and (c == 2).all()


def test_cam_bytes_round_trip_as_float16():
    cam = np.random.default_rng(2).random((4, 16, 16)).astype(np.float32)
    data = encode_cam(cam)
    assert isinstance(data, bytes) and len(data) < cam.nbytes
    np.testing.assert_allclose(decode_cam(data), cam, atol=1e-3)


class _LopsidedCams(torch.nn.Module):
    """CAMs that depend on the column (not mirror-symmetric), so a flip average is visible."""

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        ramp = torch.linspace(0, 1, x.shape[-1])[None, None, None, :]
        c1 = x[:, :1] * ramp + 1
        c2 = x[:, 2:3] * (1 - ramp) + 1
        cams = torch.cat([c1, c2], 1)
        return {"cams": [cams], "logits": [cams.mean((2, 3))]}


def test_pbip_predict_cams_matches_masks_and_flip_tta_is_mirror_consistent():
    from pbip_engine.methods.pbip.cams import predict_cams, predict_masks
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    cfg = ClassNetConfig(pretrained=False, amp=False, levels=(1,), eval_fuse_weights=(1.0,))
    model = _LopsidedCams()
    rng = np.random.default_rng(3)
    batch = {
        "image": rng.integers(0, 255, (2, 12, 12, 3), dtype=np.uint8),
        "labels": np.ones((2, 2), np.float32),
    }
    cams = predict_cams(model, batch, cfg, "cpu")
    assert cams.shape == (2, 2, 12, 12) and float(cams.min()) >= 0 and float(cams.max()) <= 1 + 1e-6
    masks, fused = predict_masks(model, batch, cfg, "cpu", "none")
    # predict_cams folds the raw-CAM tie order into the values, moving them by at most TIE_EPS.
    torch.testing.assert_close(fused, cams, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(masks, cams_to_mask(cams, batch["labels"], "none"))
    flipped = {**batch, "image": batch["image"][:, :, ::-1].copy()}
    tta = predict_cams(model, batch, cfg, "cpu", flip=True)
    torch.testing.assert_close(predict_cams(model, flipped, cfg, "cpu", flip=True).flip(-1), tta)
    assert not torch.allclose(tta, cams)


def test_pseudo_stage_stitch_function_writes_one_label_per_pixel(tmp_path):
    """The Ray Data ``map_groups`` function of the pseudo stage, called Ray-free on one slide's rows."""
    from PIL import Image

    from pbip_engine.engine.ingest.tile_slide import encode_jpeg
    from pbip_engine.jobs.pseudo import stitch_slide
    from pbip_engine.schemas.spec import parse_spec

    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}],
        "pseudo": {"background": "none", "image_prototypes": 0},
    }
    spec = parse_spec(raw, tmp_path)
    assert spec.pseudo.stitch and not spec.pseudo.flip  # the documented defaults
    assert spec.pseudo.overlap_labels == "intersect"
    xs, ys, s0, cams, _ = _disagreeing_pair()
    batch = {
        "tile_id": np.array(["s:0_0", "s:4_0"], dtype=object),
        "slide_id": np.array(["s", "s"], dtype=object),
        "x": np.array(xs),
        "y": np.array(ys),
        "size0": np.array(s0),
        "labels": np.array([[1, 1], [1, 1]], np.uint8),
        "image": np.array([encode_jpeg(np.full((8, 8, 3), 120, np.uint8), 90)] * 2, dtype=object),
        "cam": np.array([encode_cam(c) for c in cams], dtype=object),
    }
    rows = stitch_slide(batch, spec, str(tmp_path))
    assert list(rows["mask_path"]) == ["masks/s/0_0.png", "masks/s/4_0.png"] and "cam" not in rows
    a, b = (np.asarray(Image.open(tmp_path / p)) for p in rows["mask_path"])
    np.testing.assert_array_equal(a[:, 4:], b[:, :4])
    assert rows["mask"][0] == (tmp_path / rows["mask_path"][0]).read_bytes()
    # the spec's overlap_labels reaches the stitcher: A single-label settles the overlap by default ...
    batch["labels"] = np.array([[1, 0], [1, 1]], np.uint8)
    rows = stitch_slide(batch, spec, str(tmp_path))
    assert (np.asarray(Image.open(tmp_path / rows["mask_path"][1]))[:, :4] == 1).all()
    # ... and "own" keeps B's own argmax there (class 2 by its CAM)
    own = parse_spec(
        {**raw, "pseudo": {"background": "none", "image_prototypes": 0, "overlap_labels": "own"}}, tmp_path
    )
    rows = stitch_slide(batch, own, str(tmp_path))
    assert (np.asarray(Image.open(tmp_path / rows["mask_path"][1]))[:, :4] == 2).all()
    # pseudo.fill_holes reaches the stitcher: class "a" around a class-"b" core takes the core
    ring = np.zeros((2, 8, 8), np.float32)
    ring[0], ring[1, 2:6, 2:6], ring[0, 2:6, 2:6] = 0.9, 0.9, 0.1
    batch.update(labels=np.array([[1, 1]], np.uint8), cam=np.array([encode_cam(ring)], dtype=object),
                 **{k: batch[k][:1] for k in ("tile_id", "slide_id", "x", "y", "size0", "image")})  # fmt: skip
    for fill, core in (([], 2), (["a"], 1)):
        filled = parse_spec(
            {**raw, "pseudo": {"background": "none", "image_prototypes": 0, "fill_holes": fill}}, tmp_path
        )
        rows = stitch_slide(batch, filled, str(tmp_path))
        assert (np.asarray(Image.open(tmp_path / rows["mask_path"][0]))[2:6, 2:6] == core).all()


class _FlatCams(torch.nn.Module):
    """Constant CAMs: min-max normalisation flattens both classes to 0, only the raw values differ."""

    def forward(self, x):
        b, _, h, w = x.shape
        cams = torch.stack([torch.full((b, h, w), 0.2), torch.full((b, h, w), 0.7)], 1)
        return {"cams": [cams], "logits": [cams.mean((2, 3))]}


def test_stitched_path_keeps_the_raw_cam_tie_order():
    """Where normalised CAMs tie, the CAMs the stitcher averages still rank classes by the raw CAM."""
    from pbip_engine.methods.pbip.cams import predict_cams
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    cfg = ClassNetConfig(pretrained=False, amp=False, levels=(1,), eval_fuse_weights=(1.0,))
    batch = {"image": np.zeros((1, 8, 8, 3), np.uint8), "labels": np.ones((1, 2), np.float32)}
    cams = predict_cams(_FlatCams(), batch, cfg, "cpu")
    assert float(cams.max()) < 1e-2  # both flattened to ~0 ...
    assert (cams_to_mask(cams, batch["labels"], "none") == 2).all()  # ... yet class 2 (raw 0.7) wins


def test_listed_by_all_on_a_canvas():
    """Squares (x, y, side): the overlap keeps the classes both list; uncovered pixels allow every class."""
    labels = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 0]], np.float32)  # the third square is unlabelled
    every = listed_by_all([(0, 0, 4), (2, 0, 4), (0, 0, 8)], labels, 6, 8)
    assert every.shape == (3, 6, 8)
    assert (every[:, :4, 2:4] == np.array([0, 1, 0], bool)[:, None, None]).all()  # overlap: class 2 only
    assert (every[:, :4, :2] == np.array([1, 1, 0], bool)[:, None, None]).all()
    assert (every[:, :4, 4:6] == np.array([0, 1, 1], bool)[:, None, None]).all()
    assert every[:, 4:].all() and every[:, :, 6:].all()  # no labelled square there


def _ring(size: int = 12) -> np.ndarray:
    """Class 1 ring (2 px thick) around a class-2 core of 4x4 px, class 2 outside: a gland with its lumen."""
    m = np.full((size, size), 2, np.uint8)
    m[2:10, 2:10] = 1
    m[4:8, 4:8] = 2
    return m


def test_fill_enclosed_fills_holes_up_to_a_size_and_never_an_open_bay():
    m = _ring()
    filled = fill_enclosed(m, [1])
    assert (filled[2:10, 2:10] == 1).all() and (filled[m == 1] == 1).all()
    assert (filled[:2] == 2).all() and (filled[:, 10:] == 2).all()  # outside the ring: untouched
    assert (fill_enclosed(m, [1], max_px=15) == m).all()  # the 16-px hole is larger than allowed
    assert (fill_enclosed(m, [1], max_px=16)[4:8, 4:8] == 1).all()
    bay = m.copy()
    bay[5:7, 7:10] = 2  # the lumen opens to the outside through the ring: not a hole
    assert (fill_enclosed(bay, [1]) == bay).all()
    assert (fill_enclosed(m, [2]) == 2).all()  # the stroma encloses the whole gland: name the class with care
    unsure = m.copy()
    unsure[5, 5] = 255  # an undecided pixel inside the lumen is filled with it
    assert (fill_enclosed(unsure, [1])[4:8, 4:8] == 1).all()


def test_fill_holes_works_on_the_stitched_mask_across_tiles_where_the_class_is_allowed():
    """A lumen cut in two by a tile border: neither tile's own mask encloses it, the stitched one does."""
    truth = _ring()
    cams = []
    for x0 in (0, 4):  # two 8-px tiles, x = 0 and 4 (overlap at columns 4..7)
        part = truth[2:10, x0 : x0 + 8]
        cams.append(np.stack([(part == 1), (part == 2)]).astype(np.float32))
    xs, ys, s0, labels = [0, 4], [0, 0], [8, 8], np.ones((2, 2), np.float32)
    plain = stitched_masks(xs, ys, s0, cams, labels, "none")
    assert all((fill_enclosed(m, [1]) == m).all() for m in plain)  # per tile there is no hole
    a, b = stitched_masks(xs, ys, s0, cams, labels, "none", fill_holes=[1])
    assert (a[2:6, 4:8] == 1).all() and (b[2:6, 0:4] == 1).all()  # the 4x4 lumen, rows 4..7 of the ring
    assert (
        (a[0:2, 2:] == 1).all() and (a[:, :2] == 2).all() and (b[:, 6:] == 2).all()
    )  # the ring and the outside keep their labels
    assert (
        stitched_masks(xs, ys, s0, cams, labels, "none", fill_holes=[1], max_hole_px=15)[0] == plain[0]
    ).all()
    # a 2-px tile C inside the lumen lists only class 2: its pixels may not become class 1, the rest may
    cams.append(np.stack([np.zeros((2, 2)), np.ones((2, 2))]).astype(np.float32))
    a, b, c = stitched_masks([*xs, 5], [*ys, 3], [*s0, 2], cams, np.array([[1, 1], [1, 1], [0, 1]], np.float32),
                             "none", fill_holes=[1])  # fmt: skip
    assert (c == 2).all() and (a[3:5, 5:7] == 2).all() and (b[3:5, 1:3] == 2).all()
    lumen = np.zeros((8, 8), bool)
    lumen[2:6, 4:8] = True
    lumen[3:5, 5:7] = False
    assert (a[lumen] == 1).all()


def test_fill_holes_spec_names_classes_and_needs_stitching(tmp_path):
    from pbip_engine.schemas.spec import parse_spec

    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": "gland", "color": [200, 0, 0]}, {"name": "stroma", "color": [0, 0, 200]}],
    }
    spec = parse_spec({**raw, "pseudo": {"fill_holes": ["gland"], "max_hole_px": 800}}, tmp_path)
    assert spec.pseudo.fill_holes == ["gland"] and spec.pseudo.max_hole_px == 800
    assert parse_spec(raw, tmp_path).pseudo.fill_holes == []  # off by default
    with pytest.raises(ValueError, match=r"pseudo.fill_holes names unknown classes \['lumen'\]"):
        parse_spec({**raw, "pseudo": {"fill_holes": ["lumen"]}}, tmp_path)
    with pytest.raises(ValueError, match=r"pseudo\.fill_holes.*pseudo\.stitch: true"):
        parse_spec({**raw, "pseudo": {"fill_holes": ["gland"], "stitch": False}}, tmp_path)


def test_margins_are_the_lead_of_the_winner_among_the_allowed_classes():
    cam = np.zeros((3, 2, 2), np.float32)
    cam[:, 0, 0] = [0.7, 0.2, 0.6]  # lead 0.1 over class 3, 0.5 over class 2 once class 3 is ruled out
    cam[:, 0, 1] = [0.5, 0.5, 0.0]  # a tie: no lead
    ok = np.ones((3, 2, 2), bool)
    ok[2, 1, :] = False
    ok[1:, 1, 1] = False  # one class left: the labels decide
    (m,) = decision_margins([cam], [ok])
    np.testing.assert_allclose(m[0, :2], [0.1, 0.0], atol=1e-6)
    np.testing.assert_allclose(m[1, 0], 0.0)
    assert m[1, 1] == np.inf


def test_the_least_certain_fraction_is_taken_per_slide_over_every_tile():
    a = np.array([[0.1, 0.2], [0.3, np.inf]], np.float32)
    b = np.array([[0.4, 0.5], [0.6, 0.7]], np.float32)
    da, db = least_certain([a, b], 0.3)  # 7 finite margins: the quantile cut is 0.28
    assert da.tolist() == [[True, True], [False, False]] and not db.any()
    assert not any(d.any() for d in least_certain([a, b], 0.0))
    assert least_certain([np.full((2, 2), np.inf, np.float32)], 0.5)[0].sum() == 0  # nothing the CAMs decide


def test_margins_of_stitched_masks_skip_what_labels_and_the_fill_decide():
    xs, ys, s0, cams, labels = _disagreeing_pair()
    masks, margins = stitched_masks_and_margins(xs, ys, s0, cams, labels, "none")
    for m, n in zip(masks, stitched_masks(xs, ys, s0, cams, labels, "none"), strict=True):
        np.testing.assert_array_equal(m, n)  # the masks are the same with or without the margins
    np.testing.assert_allclose(margins[0][:, :4], 0.4, atol=1e-5)  # A alone: 0.6 - 0.2
    np.testing.assert_allclose(margins[0][:, 4:], 0.2, atol=1e-5)  # the overlap: 0.55 - 0.35
    # B single-label: it settles the overlap for A, and its own pixels, so no margin there
    _, margins = stitched_masks_and_margins(xs, ys, s0, cams, np.array([[1, 1], [0, 1]], np.float32), "none")
    assert np.isinf(margins[0][:, 4:]).all() and np.isinf(margins[1]).all()
    assert np.isfinite(margins[0][:, :4]).all()
    # a filled hole is the fill's decision, not the argmax's
    ring = np.zeros((2, 8, 8), np.float32)
    ring[0], ring[1, 2:6, 2:6], ring[0, 2:6, 2:6] = 0.9, 0.9, 0.1
    (mask,), (margin,) = stitched_masks_and_margins([0], [0], [8], [ring], np.ones((1, 2), np.float32),
                                                    "none", fill_holes=[1])  # fmt: skip
    assert (mask[2:6, 2:6] == 1).all() and np.isinf(margin[2:6, 2:6]).all()
    assert np.isfinite(margin[0]).all()


def test_ignore_uncertain_unlabels_the_least_certain_pixels_of_the_regions_only(tmp_path):
    """``pseudo.ignore_uncertain`` reaches the stage: regions lose labels, the tile masks keep theirs."""
    import cv2
    import pyarrow.parquet as pq
    from PIL import Image

    from pbip_engine.engine.ingest.tile_slide import encode_jpeg
    from pbip_engine.engine.pseudo.regions import IGNORE
    from pbip_engine.jobs.pseudo import stitch_slide
    from pbip_engine.jobs.rundir import REGIONS
    from pbip_engine.schemas.spec import parse_spec

    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}],
        "segmenter": {"crop_px": 32},
    }
    with pytest.raises(ValueError, match="ignore_uncertain"):
        parse_spec({**raw, "segmenter": {}, "pseudo": {"ignore_uncertain": 0.2}}, tmp_path)
    cam = np.zeros((2, 8, 8), np.float32)
    cam[0] = np.linspace(0.55, 1.0, 8)[None]  # class a leads by more and more from left to right
    cam[1] = 0.5
    batch = {
        "tile_id": np.array(["s:0_0"], dtype=object), "slide_id": np.array(["s"], dtype=object),
        "x": np.array([0]), "y": np.array([0]), "size0": np.array([8]), "labels": np.array([[1, 1]], np.uint8),
        "image": np.array([encode_jpeg(np.full((8, 8, 3), 120, np.uint8), 90)], dtype=object),
        "cam": np.array([encode_cam(cam)], dtype=object),
    }  # fmt: skip
    for frac, unlabelled in ((0.0, 0), (0.25, 16)):
        spec = parse_spec(
            {**raw, "pseudo": {"background": "none", "image_prototypes": 0, "ignore_uncertain": frac}},
            tmp_path,
        )
        rows = stitch_slide(batch, spec, str(tmp_path))
        tile = np.asarray(Image.open(tmp_path / rows["mask_path"][0]))
        assert (tile != IGNORE).all()  # the tile mask (and its score) keeps every label
        region = pq.read_table(tmp_path / REGIONS / "s.parquet").to_pylist()[0]
        mask = cv2.imdecode(np.frombuffer(region["mask"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert int((mask == IGNORE).sum()) == unlabelled
        if unlabelled:
            assert (mask[:, :2] == IGNORE).all() and (mask[:, 2:] == tile[:, 2:]).all()  # the smallest leads
