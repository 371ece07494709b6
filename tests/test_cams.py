"""CAM fusion, pseudo-mask background rules and palettised PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pbip_engine.engine.pseudo.cams import CamError, cams_to_mask, fuse_cams, white_mask, write_palette_png


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
    # pixel 1 ties at 0 between present classes 2 and 3 -> lowest present class (2), never absent class 1
    assert m[0, 0].tolist() == [2, 2, 2]
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
