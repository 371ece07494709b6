"""CAMs read on a slide's stitched tiles as one picture (``pseudo.cam_context: regions``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pbip_engine.engine.pseudo.region_cams import read_canvas, region_tile_cams, tile_maps
from pbip_engine.engine.pseudo.stitch import tile_layout
from pbip_engine.methods.base import MasksFromCams

SPEC = {  # a two-class pbip spec: pseudo.cam_context resolves to pbip's default
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 768}},
    "classes": [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}],
}


def _box_reader(image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """A local reader: CAMs = 3x3 box means of two channels (a 1-px reach), features = 4x4-pooled channels."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    cams = F.avg_pool2d(F.pad(x[:, :2], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0].numpy()
    feats = F.normalize(F.avg_pool2d(x + 0.1, 4), dim=1)[0].numpy()
    return cams, [feats]


def test_windows_with_a_margin_read_the_canvas_as_one_pass_would():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    whole_c, whole_f = read_canvas(image, _box_reader, 64, 0)
    # windows of 32 x 24 with 4 px of context: the box filter's 1-px reach never meets a window's edge
    c, f = read_canvas(image, _box_reader, 32, 4)
    np.testing.assert_allclose(c, whole_c, atol=1e-6)
    assert f[0].shape == whole_f[0].shape == (3, 12, 16)
    np.testing.assert_allclose(f[0], whole_f[0], atol=1e-5)
    # without the margin the windows' edges see replicated pixels, not their neighbours
    c0, _ = read_canvas(image, _box_reader, 32, 0)
    assert not np.allclose(c0, whole_c, atol=1e-3)


def test_windows_no_tile_covers_are_not_read():
    calls = []

    def reader(image):
        calls.append(image.shape)
        return _box_reader(image)

    covered = np.zeros((48, 64), bool)
    covered[:10, :10] = True
    cams, _ = read_canvas(np.zeros((48, 64, 3), np.uint8), reader, 32, 4, covered)
    assert len(calls) == 1 and calls[0] == (28, 36, 3)  # the top-left window and its 4-px context
    assert not cams[:, 24:, :].any() and not cams[:, :, 32:].any()


def test_a_models_cap_shrinks_the_windows_and_their_margin_to_fit():
    """``max_read_px``: no read exceeds it (its margin included), and with the margin still wider than the
    reader's reach the tiles' CAMs are the uncapped ones."""
    layout = tile_layout([0, 16, 32, 48], [0, 0, 0, 0], [32] * 4, [32] * 4)  # 80 x 32 canvas
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    sizes: list[tuple[int, int]] = []

    def reader(image):
        sizes.append(image.shape[:2])
        return _box_reader(image)

    free, _ = region_tile_cams(layout, images, reader, 512, 32)
    assert sizes == [(32, 80)]
    sizes.clear()
    capped, _ = region_tile_cams(layout, images, reader, 512, 32, max_read_px=40)
    assert len(sizes) > 1 and max(max(s) for s in sizes) <= 40  # margin 10, windows of 20
    for a, b in zip(free, capped, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_each_tile_takes_its_own_area_of_the_canvas():
    layout = tile_layout([0, 4], [0, 0], [8, 8], [8, 8])  # two 8-px tiles overlapping by half
    assert layout[1:] == (8, 12)
    cams = np.arange(8 * 12, dtype=np.float32).reshape(1, 8, 12)
    feats = [np.arange(6, dtype=np.float32).reshape(1, 2, 3)]  # one level of 4-px cells
    tc, tf = tile_maps(cams, feats, layout, [8, 8])
    np.testing.assert_array_equal(tc[0], cams[:, :, :8])
    np.testing.assert_array_equal(tc[1], cams[:, :, 4:])
    np.testing.assert_array_equal(tf[0][0], feats[0][:, :, 0:2])
    np.testing.assert_array_equal(tf[1][0], feats[0][:, :, 1:3])
    # a tile whose CAM side is not its canvas extent gets its area resized to its side
    small, _ = tile_maps(cams, [], layout, [8, 4])
    assert small[1].shape == (1, 4, 4)


def test_a_tile_read_in_its_slide_sees_its_neighbours():
    """The read-out reaches across tiles: with a reader that scores every pixel by its window's mean, both tiles
    of one slide get the slide's score, while each alone would get its own."""

    def window_mean(image):
        m = image.mean() / 255
        return np.full((2, *image.shape[:2]), [[[m]], [[1 - m]]], np.float32), []

    dark, pale = np.full((8, 8, 3), 50, np.uint8), np.full((8, 8, 3), 200, np.uint8)
    layout = tile_layout([0, 8], [0, 0], [8, 8], [8, 8])
    cams, feats = region_tile_cams(layout, [dark, pale], window_mean, 512, 8)
    assert feats == [[], []]
    np.testing.assert_allclose(cams[0], cams[1])
    np.testing.assert_allclose(cams[0][0], 125 / 255, atol=1e-6)
    assert window_mean(dark)[0][0, 0, 0] != pytest.approx(cams[0][0, 0, 0])


class _LocalCams(torch.nn.Module):
    """CAMs and features from the pixels themselves (no spatial reach), at full and half resolution."""

    def forward(self, x: torch.Tensor) -> dict:
        f0, f1 = x, F.avg_pool2d(x, 2)
        cams = [torch.cat([f[:, :1] + 1, f[:, 2:3] + 1], 1) for f in (f0, f1)]
        return {"cams": cams, "logits": [c.mean((2, 3)) for c in cams], "features": [f0, f1],
                "scales": torch.tensor([2.0, 4.0])}  # fmt: skip


def _pbip_cam_model(input_px: int):
    from pbip_engine.methods.pbip.cams import PbipCamModel
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    m = PbipCamModel.__new__(PbipCamModel)  # the network is a stand-in, not a checkpoint
    m.model, m.device = _LocalCams(), "cpu"
    m.cfg = ClassNetConfig(pretrained=False, amp=False, levels=(1, 2), eval_fuse_weights=(1.0, 1.0),
                           cam_readout="raw", input_px=input_px)  # fmt: skip
    return m


def test_pbip_reads_a_region_at_the_scale_its_tiles_entered_the_network():
    from pbip_engine.methods.base import PseudoOptions

    model = _pbip_cam_model(input_px=16)  # 8-px tiles entered the network at 16 px
    rng = np.random.default_rng(2)
    tile = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    opts = PseudoOptions(flip=True)
    tile_cams, tile_feats, w = model.predict_cams_and_features({"image": tile[None]}, opts)
    cams, feats, weights = model.predict_region(tile, 8, opts, True)
    np.testing.assert_allclose(cams, tile_cams[0], atol=1e-5)  # one tile as a region = the tile read
    assert [f.shape for f in feats] == [(3, 16, 16), (3, 8, 8)] and weights == pytest.approx(w)
    np.testing.assert_allclose(feats[1].astype(np.float32), tile_feats[1][0].astype(np.float32), atol=2e-3)
    # a 24 x 40 region enters at twice its size too: its features have 2x the cells, its CAMs its size
    region = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    cams, feats, _ = model.predict_region(region, 8, opts, False)
    assert cams.shape == (2, 24, 40) and feats == []
    np.testing.assert_allclose(cams.sum(0), 1.0, atol=1e-5)  # the raw read-out: a softmax over classes


def test_the_stage_reads_a_slide_as_one_picture(tmp_path, monkeypatch):
    """``RegionPseudo`` on one slide of two tiles: the CAM model reads the slide once, and the masks, the
    samples rows and the stitched region come out as the tile-stitching path writes them."""
    import pyarrow.parquet as pq
    from PIL import Image

    import pbip_engine.jobs.pseudo as job
    from pbip_engine.engine.ingest.tile_slide import encode_jpeg
    from pbip_engine.jobs.rundir import REGIONS
    from pbip_engine.schemas.spec import parse_spec

    reads = []

    class Model(MasksFromCams):
        def predict_region(self, image, tile_px, options, features):
            reads.append((image.shape, tile_px, features))
            cams = np.zeros((2, *image.shape[:2]), np.float32)
            cams[0, :, : image.shape[1] // 2], cams[1, :, image.shape[1] // 2 :] = 1, 1  # left a, right b
            return cams, [], []

    monkeypatch.setattr(job, "_cam_model", lambda *a: Model())
    spec = parse_spec({**SPEC, "pseudo": {"background": "none", "image_prototypes": 0}}, tmp_path)
    assert spec.pseudo.cam_context == "regions"  # pbip's default
    batch = {
        "tile_id": np.array(["s:0_0", "s:16_0"], dtype=object), "slide_id": np.array(["s", "s"], dtype=object),
        "x": np.array([0, 16]), "y": np.array([0, 0]), "size0": np.array([32, 32]),
        "labels": np.array([[1, 1], [1, 1]], np.uint8),
        "image": np.array([encode_jpeg(np.full((16, 16, 3), 120, np.uint8), 90)] * 2, dtype=object),
    }  # fmt: skip
    rows = job.RegionPseudo(spec, "model.pt", None, str(tmp_path)).slide(batch)
    assert reads == [((16, 24, 3), 16, False)]  # the two 16-px tiles, half overlapping, read once
    left, right = (np.asarray(Image.open(tmp_path / p)) for p in rows["mask_path"])
    assert (left[:, :12] == 1).all() and (left[:, 12:] == 2).all()  # the slide's middle, not each tile's
    assert (right[:, :4] == 1).all() and (right[:, 4:] == 2).all()
    region = pq.read_table(tmp_path / REGIONS / "s.parquet").to_pylist()
    assert len(region) == 1 and (region[0]["width"], region[0]["height"]) == (24, 16)


def test_the_default_is_the_methods_and_the_spec_checks_the_key(tmp_path, monkeypatch):
    from pbip_engine.methods import get_method
    from pbip_engine.schemas.spec import SpecError, check_inputs, parse_spec

    raw = SPEC
    for method in ("pbip", "lpd"):  # measured to help
        assert parse_spec({**raw, "method": {"name": method}}, tmp_path).pseudo.cam_context == "regions"
    assert (
        parse_spec({**raw, "method": {"name": "gland"}}, tmp_path).pseudo.cam_context == "tiles"
    )  # tiles only
    assert parse_spec({**raw, "pseudo": {"stitch": False}}, tmp_path).pseudo.cam_context == "tiles"
    with pytest.raises(ValueError, match=r"cam_context.*stitch"):
        parse_spec({**raw, "pseudo": {"cam_context": "regions", "stitch": False}}, tmp_path)
    lpd = parse_spec({**raw, "method": {"name": "lpd"}, "pseudo": {"cam_context": "tiles"}}, tmp_path)
    assert lpd.pseudo.cam_context == "tiles"
    gland = parse_spec({**raw, "method": {"name": "gland"}, "pseudo": {"cam_context": "regions"}}, tmp_path)
    check_inputs(gland)  # gland's CAM model reads whole pictures too
    monkeypatch.setattr(type(get_method("gland")), "region_cams", False)  # a method that reads tiles only
    with pytest.raises(SpecError, match=r"cam_context.*'gland'"):
        check_inputs(gland)
