"""The dense CRF over a slide's stitched canvas (``pseudo.crf`` with ``pseudo.stitch``)."""

import numpy as np
import pytest

pytest.importorskip("pydensecrf", reason="pydensecrf2 (the dev extra) is not installed")

from pbip_engine.engine.pseudo.crf import CrfKernels, canvas_crf
from pbip_engine.engine.pseudo.stitch import stitched_masks_and_margins

SIDE = 32
EDGE = 29  # a sharp red | blue edge near the right border of the first tile


def two_tiles():
    """A 64 x 32 slide as two side-by-side tiles; CAMs blurred and off by six px (class 1 up to x ~ 35)."""
    x = np.arange(2 * SIDE)
    rgb = np.where((x < EDGE)[None, :, None], [220, 30, 30], [30, 30, 220]).astype(np.uint8)
    rgb = np.repeat(rgb, SIDE, axis=0)
    ramp = np.clip((x - 29) / 12, 0, 1).astype(np.float32)
    cam = np.repeat(np.stack([1 - ramp, ramp])[:, None, :], SIDE, axis=1)
    tiles = ([0, SIDE], [0, 0], [SIDE, SIDE])
    cams = [cam[:, :, :SIDE], cam[:, :, SIDE:]]
    rgbs = [rgb[:, :SIDE], rgb[:, SIDE:]]
    truth = np.repeat(np.where(x < EDGE, 1, 2)[None], SIDE, axis=0)
    return tiles, cams, rgbs, truth


def test_the_stitched_crf_settles_an_edge_from_both_sides_of_a_tile_border():
    tiles, cams, rgbs, truth = two_tiles()
    labels = np.ones((2, 2), np.float32)
    plain, plain_lead = stitched_masks_and_margins(*tiles, cams, labels, "none", rgbs)
    crf, lead = stitched_masks_and_margins(
        *tiles, cams, labels, "none", rgbs, crf=True, crf_kernels=CrfKernels()
    )
    acc = lambda masks: (np.concatenate(masks, axis=1) == truth).mean()  # noqa: E731
    assert acc(plain) < 0.9
    assert acc(crf) > 0.98  # the second tile's left columns are blue like its right: the canvas CRF sees it
    # ignore_uncertain ranks the CAMs' margins with the CRF too: where the CRF moved an edge the CAMs were unsure,
    # and those pixels must stay the first to go (the CRF marginals' own leads taught stage 2 worse on GlaS)
    for a, b in zip(lead, plain_lead, strict=True):  # a CAM tie (inf without the CRF) is the CRF's to settle
        both = np.isfinite(b)
        assert both.mean() > 0.9
        np.testing.assert_array_equal(a[both], b[both])
    moved = np.concatenate(crf, axis=1) != np.concatenate(plain, axis=1)
    margins = np.concatenate(lead, axis=1)
    assert moved.any() and margins[moved].mean() < margins[~moved].mean()


def test_a_class_the_labels_rule_out_never_comes_back_through_the_crf():
    tiles, cams, rgbs, _ = two_tiles()
    labels = np.array([[1, 1], [1, 0]], np.float32)  # the second tile lists class 1 only
    crf, lead = stitched_masks_and_margins(*tiles, cams, labels, "none", rgbs, crf=True)
    assert (crf[1] == 1).all()
    assert np.isinf(lead[1]).all()  # the labels decided there, not the CRF
    assert (crf[0][:, :EDGE] == 1).all()


def test_windows_with_a_margin_decide_as_one_pass_does():
    rng = np.random.default_rng(0)
    h, w = 96, 120
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - 40) ** 2 + (xx - 70) ** 2 < 30**2) | ((yy - 75) ** 2 + (xx - 20) ** 2 < 15**2)
    rgb = np.where(blob[..., None], [200, 60, 150], [240, 180, 220]).astype(np.float32)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    score = np.clip(blob + rng.normal(0, 0.45, blob.shape), 0, 1).astype(np.float32)
    scores = np.stack([score, 1 - score])
    allowed = np.ones_like(scores, bool)
    whole = canvas_crf(scores, allowed, rgb, CrfKernels(), window=1024)
    parts = canvas_crf(scores, allowed, rgb, CrfKernels(), window=40)
    assert (whole == parts).mean() > 0.99
    assert (whole == np.where(blob, 0, 1)).mean() > (scores.argmax(0) == np.where(blob, 0, 1)).mean()
    assert whole.shape == (h, w) and (whole >= 0).all()  # every pixel allows a class, so every pixel has one


def test_the_spec_sets_the_kernels_in_micrometres():
    from pbip_engine.schemas.spec import PseudoSection

    opts = PseudoSection(crf=True).crf_options
    fine, coarse = opts.kernels(0.5), opts.kernels(1.0)
    assert fine.bilateral_sxy == pytest.approx(2 * coarse.bilateral_sxy)
    assert fine.gaussian_sxy == pytest.approx(2 * coarse.gaussian_sxy)
    assert fine.bilateral_srgb == coarse.bilateral_srgb  # colour is not a length
    assert opts.kernels(1.24).bilateral_sxy == pytest.approx(CrfKernels().bilateral_sxy, rel=0.01)
