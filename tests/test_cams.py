"""CAM fusion, pseudo-mask background rules and palettised PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pbip_engine.engine.pseudo.cams import (
    UNCERTAIN,
    UNCERTAIN_COLOR,
    CamError,
    cams_to_mask,
    fuse_cams,
    white_mask,
    write_palette_png,
)


def test_fuse_cams_minmax_and_weights():
    a = torch.tensor([[[[0.0, 2.0], [4.0, -1.0]]]])  # ReLU -> [0,2,4,0] -> min-max [0,.5,1,0]
    b = torch.tensor([[[[1.0, 1.0], [1.0, 3.0]]]])  # -> [0,0,0,1]
    fused = fuse_cams([a, b], (2, 2), weights=[3.0, 1.0])  # weights normalised to 0.75 / 0.25
    expected = 0.75 * torch.tensor([[0.0, 0.5], [1.0, 0.0]]) + 0.25 * torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(fused[0, 0], expected)
    up = fuse_cams([torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2)], (16, 16))
    assert up.shape == (2, 3, 16, 16) and up.min() >= 0 and up.max() <= 1 + 1e-6
    with pytest.raises(CamError):
        fuse_cams([a], (2, 2), weights=[0.0])


def test_none_background_restricts_to_labels():
    fused = torch.zeros(2, 3, 1, 3)
    fused[0, 0, 0] = torch.tensor([0.9, 0.0, 0.2])  # class 1 strong but absent from the label
    fused[0, 1, 0] = torch.tensor([0.1, 0.0, 0.3])
    fused[0, 2, 0] = torch.tensor([0.0, 0.0, 0.1])
    labels = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    m = cams_to_mask(fused, labels, "none")
    assert m.dtype == np.uint8 and m.shape == (2, 1, 3)
    # pixel 1 ties at 0 between present classes 2 and 3: undecided (255), never absent class 1
    assert m[0, 0].tolist() == [2, UNCERTAIN, 2]
    assert m[1].max() == 0  # no positive label -> all background


def test_power_background():
    fused = torch.tensor([[[[0.95, 0.05]], [[0.0, 0.02]]]])  # [1, 2, 1, 2]
    m = cams_to_mask(fused, torch.ones(1, 2), "power", power=10)
    # pixel 0: bg = (1-0.95)^10 ~ 0 -> class 1; pixel 1: bg = (1-0.05)^10 = 0.60 > 0.05 -> background
    assert m[0, 0].tolist() == [1, 0]


def test_white_background_and_min_size():
    rgb = np.full((1, 20, 20, 3), 100, np.uint8)
    rgb[0, :10, :10] = 250  # 100 px white block -> background
    rgb[0, 15, 15] = 250  # 1 px speck -> kept (below min_size)
    wm = white_mask(rgb[0], threshold=200, min_size=50)
    assert wm.sum() == 100 and not wm[15, 15]
    fused = torch.rand(1, 2, 20, 20)
    m = cams_to_mask(fused, torch.ones(1, 2), "white", rgb=rgb, min_size=50)
    assert (m[0, :10, :10] == 0).all() and (m[0, 10:, 10:] > 0).all()
    with pytest.raises(CamError, match="needs the RGB"):
        cams_to_mask(fused, torch.ones(1, 2), "white")
    with pytest.raises(CamError, match="background must be"):
        cams_to_mask(fused, torch.ones(1, 2), "black")


def test_write_palette_png_roundtrip(tmp_path):
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    colors = [(255, 255, 255), (255, 0, 0), (0, 255, 0)]
    p = write_palette_png(tmp_path / "sub" / "m.png", mask, colors)
    with Image.open(p) as im:
        assert im.mode == "P"
        assert np.array(im).tolist() == mask.tolist()
        assert im.getpalette()[:9] == [255, 255, 255, 255, 0, 0, 0, 255, 0]
    assert [f.name for f in p.parent.iterdir()] == ["m.png"]  # no temp file left behind
    with pytest.raises(CamError, match="no colour"):
        write_palette_png(tmp_path / "x.png", np.array([[5]], np.uint8), colors)


def test_default_white_prior_keeps_pale_stroma_and_removes_glass():
    # Audit cause 3: grey > 200 called 28 % of the demo's stroma glass.
    from pbip_engine.methods.base import PseudoOptions
    from pbip_engine.schemas.spec import PseudoSection

    rgb = np.full((1, 96, 96, 3), (150, 80, 160), np.uint8)  # H&E-purple tissue
    rgb[0, 5:45, 5:45] = (235, 200, 215)  # pale-pink stroma, grey ~ 212
    rgb[0, 60:90, 60:90] = (245, 245, 245)  # glass, 900 px
    rgb[0, 50:55, 10:15] = (245, 245, 245)  # a 25-px lumen-sized speck of white
    fused = torch.rand(1, 2, 96, 96)
    m = cams_to_mask(fused, torch.ones(1, 2), "white", rgb=rgb)
    assert (m[0, 5:45, 5:45] > 0).all(), "pale stroma taken for glass"
    assert (m[0, 60:90, 60:90] == 0).all(), "glass kept as tissue"
    assert (m[0, 50:55, 10:15] > 0).all()
    assert white_mask(rgb[0]).sum() == 900
    p, o = PseudoSection(), PseudoOptions()
    assert (p.white_threshold, p.min_object) == (o.white_threshold, o.min_object) == (225, 400)


def test_argmax_ties_do_not_go_to_the_first_class():
    # Audit cause 9: where both CAMs are clamped to 0 the old argmax gave class 1 everywhere.
    fused = torch.zeros(1, 2, 4, 4)
    fused[0, 0, :2] = 0.8  # class 1 in the top half, no signal in the bottom half
    m = cams_to_mask(fused, torch.ones(1, 2), "none")
    assert (m[0, :2] == 1).all() and (m[0, 2:] == UNCERTAIN).all()
    raw = torch.zeros(1, 2, 4, 4)
    raw[0, 0, 2:, :2] = -0.1  # below the ReLU the classes still differ: class 2 is closer on the left,
    raw[0, 1, 2:, 2:] = -0.1  # class 1 on the right
    m = cams_to_mask(fused, torch.ones(1, 2), "none", tie_break=raw)
    assert (m[0, :2] == 1).all()
    assert (m[0, 2:, :2] == 2).all() and (m[0, 2:, 2:] == 1).all()
    raw[0, :, 2:] = 0.0  # raw ties too: no information, no decision
    assert (cams_to_mask(fused, torch.ones(1, 2), "none", tie_break=raw)[0, 2:] == UNCERTAIN).all()
    assert (cams_to_mask(fused, torch.tensor([[0.0, 1.0]]), "none")[0] == 2).all()  # one class: no tie
    assert (cams_to_mask(fused, torch.ones(1, 2), "power")[0, 2:] == 0).all()  # power: background wins
    with pytest.raises(CamError, match="tie_break"):
        cams_to_mask(fused, torch.ones(1, 2), "none", tie_break=raw[:, :1])


def test_raw_fusion_keeps_the_sign():
    a = torch.tensor([[[[0.0, 2.0], [4.0, -1.0]]]])
    b = torch.tensor([[[[1.0, 1.0], [1.0, 3.0]]]])
    raw = fuse_cams([a, b], (2, 2), weights=[3.0, 1.0], normalize=False)
    torch.testing.assert_close(raw[0, 0], 0.75 * a[0, 0] + 0.25 * b[0, 0])


def test_uncertain_pixels_have_a_colour_in_pngs_and_mosaics(tmp_path):
    from pbip_engine.engine.metrics import read_mask
    from pbip_engine.engine.pseudo.mosaics import slide_mosaics

    mask = np.array([[0, 1], [UNCERTAIN, 1]], np.uint8)
    p = write_palette_png(tmp_path / "m.png", mask, [(255, 255, 255), (255, 0, 0)])
    assert read_mask(p).tolist() == mask.tolist()
    with Image.open(p) as im:
        assert tuple(np.array(im.convert("RGB"))[1, 0]) == UNCERTAIN_COLOR
    row = {"slide_id": "s", "x": 0, "y": 0, "size0": 2, "mask_path": "m.png"}
    assert slide_mosaics([row], tmp_path, [(255, 0, 0)], max_px=2) == 1
