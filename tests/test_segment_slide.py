"""segment_slide: plan -> predict -> stitch -> OME-TIFF/GeoJSON/PNG, every output read back.

The "model" in most tests is a fixed 1x1 convolution that maps colour to class (glass -> 0, red -> 1,
blue -> 2), so the expected mask is known exactly and any misalignment between tiles, the output grid
and the slide's level-0 frame shows up as wrong pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import tifffile
import torch
from shapely.geometry import shape
from torch import nn
from wsi_synth import write_pyramid as write_slide

import pbip_engine
from pbip_engine.engine.inference.segment_slide import (
    SegmentError,
    SegmentPredictor,
    TileReader,
    iter_tile_pixels,
    open_any,
    plan,
    segment_local,
    stitch_and_write,
    tile_to_output,
)
from pbip_engine.engine.outputs.tiff_writer import read_label_classes
from pbip_engine.engine.wsi.grid import grid_positions

CLASSES = ["Tumor", "Stroma"]
COLORS = [(200, 0, 0), (0, 0, 200)]
GLASS, RED, BLUE = (240, 240, 240), (200, 60, 60), (60, 60, 200)


@pytest.fixture(autouse=True)
def _tiffslide_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch is imported by now; a first CuImage opened after torch hangs in cuCIM's GDS init (see report).
    monkeypatch.setattr(pbip_engine, "CUCIM_AVAILABLE", False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny tensors on a shared 2-core box: OpenMP spin-waiting makes 2 threads 10-100x slower than 1.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ColorNet(nn.Module):
    """logits = [mean(RGB) - 0.6, R - B, B - R] on [0, 1] RGB: glass -> 0, red -> 1, blue -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        w = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]])
        self.conv.weight.data = w.view(3, 3, 1, 1)
        self.conv.bias.data = torch.tensor([-0.6, 0.0, 0.0])
        self.config = {"n_classes": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _toy(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Glass with a red and a blue rectangle; edges on multiples of 64 level-0 pixels."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS
    truth = np.zeros((h, w), np.uint8)
    img[128:640, 192:768] = RED
    truth[128:640, 192:768] = 1
    img[384:896, 768:1280] = BLUE
    truth[384:896, 768:1280] = 2
    return img, truth


@pytest.fixture(scope="module")
def toy_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("slide")
    img, truth = _toy(1024, 1536)
    path = write_slide(d / "toy.tif", img, mpp=0.5, n_levels=3, tile=64, compression="zlib")
    return path, truth


def test_grid_covers_the_whole_extent_with_the_last_tile_flush():
    for length, size, stride in [(1000, 128, 96.0), (128, 128, 96.0), (1001, 100, 75.0), (50, 128, 96.0)]:
        pos = grid_positions(length, size, stride, edge="overhang")
        covered = np.zeros(max(length, size), bool)
        for p in pos:
            covered[p : p + size] = True
        assert covered[:length].all()
        assert pos[0] == 0 and (length <= size or pos[-1] + size == length)
        assert (np.diff(pos) <= stride + 0.5).all()


def test_tile_to_output_is_identity_when_aligned_and_resamples_otherwise():
    maps = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    i, j, out = tile_to_output(16, 24, 32, maps, 4.0)  # tile pixel = 4 level-0 px = output pixel
    assert (i, j) == (6, 4) and out is maps
    # Output pixels twice as coarse: 2x2 block means (up to the antialiasing kernel's tails).
    const = np.zeros((1, 8, 8), np.float32)
    const[0, :, 4:] = 1.0
    i, j, out = tile_to_output(0, 0, 32, const, 8.0)
    assert out.shape == (1, 4, 4)
    assert (out[0, :, :2] < 0.5).all() and (out[0, :, 2:] > 0.5).all()
    np.testing.assert_allclose(out.sum(), const.sum() / 4, rtol=1e-5)


def test_plan_tiles_tissue_at_model_resolution(toy_slide):
    path, truth = toy_slide
    p = plan(path, model_mpp=1.0, tile_px=128, overlap=0.25)
    assert p.slide_mpp == 0.5 and p.dimensions == (1536, 1024)
    assert p.tiles and all(t.size0 == 256 and t.level == 1 and t.read_size == 128 for t in p.tiles)
    # Every tissue pixel lies in some tile; no tile is pure glass.
    covered = np.zeros_like(truth, bool)
    for t in p.tiles:
        covered[t.y : t.y + t.size0, t.x : t.x + t.size0] = True
        assert truth[t.y : t.y + t.size0, t.x : t.x + t.size0].any()
    assert covered[truth > 0].all()
    assert p.tissue is not None and p.tissue_mpix == pytest.approx(p.tissue_area_um2 / 0.25 / 1e6)
    table = p.tile_table()
    assert len(table["x"]) == len(p.tiles) and set(table) >= {
        "x",
        "y",
        "size0",
        "level",
        "read_size",
        "slide_path",
    }


def test_default_overlap_predicts_each_interior_tissue_pixel_from_four_tiles(toy_slide):
    """The segment stage's default (``segment.overlap``, the engine's ``plan``): half-tile steps, so the blend
    averages four tile positions at every pixel away from the grid's edges (0.25 gave one at tile centres)."""
    from pbip_engine.schemas.spec import SegmentSection

    path, truth = toy_slide
    p = plan(path, model_mpp=1.0, tile_px=128, overlap=SegmentSection().overlap)
    count = np.zeros(truth.shape, np.int32)
    for t in p.tiles:
        count[t.y : t.y + t.size0, t.x : t.x + t.size0] += 1
    xs, ys = sorted({t.x for t in p.tiles}), sorted({t.y for t in p.tiles})
    inner = count[ys[1] : ys[-1], xs[1] : xs[-1]] if len(xs) > 2 and len(ys) > 2 else count[:0]
    full = truth[ys[1] : ys[-1], xs[1] : xs[-1]] > 0
    assert inner.size and full.any()
    assert (inner[full] >= 4).all()


def test_tile_reader_matches_direct_reads(toy_slide):
    path, _ = toy_slide
    p = plan(path, model_mpp=1.0, tile_px=128, overlap=0.25)
    table = {k: v[:6] for k, v in p.tile_table().items()}
    out = TileReader(128)(table)
    with open_any(path) as slide:
        direct = [px for _, px in iter_tile_pixels(slide, p.tiles[:6], 128)]
    np.testing.assert_array_equal(out["image"], np.stack(direct))
    np.testing.assert_array_equal(out["x"], table["x"])


def test_segment_local_outputs_read_back(toy_slide, tmp_path):
    path, truth = toy_slide
    pred = SegmentPredictor(ColorNet(), device="cpu")
    stats = segment_local(
        path, pred, tmp_path, CLASSES, COLORS, model_mpp=1.0, tile_px=128, output_mpp=2.0,
        batch_size=8, restrict_to_tissue=False, tiff_tile=64, pyramid_min_size=64,
    )  # fmt: skip
    expected = truth[::4, ::4]  # output pixel (i, j) covers level-0 [4j, 4j+4) x [4i, 4i+4)

    # -- OME-TIFF label pyramid
    mask_path = tmp_path / "toy.mask.ome.tif"
    with tifffile.TiffFile(mask_path) as tf:
        assert tf.is_ome
        page = tf.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and page.dtype == np.uint8
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(256, 384), (128, 192), (64, 96), (32, 48)]
        np.testing.assert_array_equal(levels[0].asarray(), expected)
        assert set(np.unique(levels[2].asarray())) <= {0, 1, 2}
        xres = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert 1e4 * xres[1] / xres[0] == pytest.approx(2.0)
        assert 'PhysicalSizeX="2.0"' in page.description
    assert read_label_classes(mask_path) == [(n, c) for n, c in zip(CLASSES, COLORS, strict=True)]
    import tiffslide

    with tiffslide.TiffSlide(mask_path) as ts:
        assert ts.level_count == 4
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
        region = np.asarray(ts.read_region((0, 0), 0, (384, 256), as_array=True))
        np.testing.assert_array_equal(region.reshape(256, 384, -1)[..., 0], expected)

    # -- GeoJSON: valid, classified with name+colour, level-0 coordinates, areas in µm²
    gj = json.loads((tmp_path / "toy.classes.geojson").read_text())
    feats = {f["properties"]["classification"]["name"]: f for f in gj["features"]}
    assert set(feats) == set(CLASSES)
    for k, name in enumerate(CLASSES, start=1):
        props = feats[name]["properties"]
        assert props["classification"]["color"] == list(COLORS[k - 1])
        assert props["objectType"] == "annotation"
        geom = shape(feats[name]["geometry"])
        assert geom.is_valid and not geom.is_empty
        true_px = int((truth == k).sum())
        assert geom.area == pytest.approx(true_px)  # level-0 pixels²
        assert props["measurements"]["Area µm^2"] == pytest.approx(true_px * 0.25)
        assert stats["class_areas_um2"][name] == pytest.approx(true_px * 0.25)
    red = shape(feats["Tumor"]["geometry"])
    assert red.bounds == (192.0, 128.0, 768.0, 640.0)
    assert all(shapely.is_valid(shape(f["geometry"])) for f in gj["features"])

    # -- overlay PNG and statistics
    ov = cv2.imread(str(tmp_path / "toy.overlay.png"))
    assert ov is not None and ov.shape[1] == 1600 and ov.shape[0] > 1600 * 1024 // 1536
    assert stats["n_tiles"] > 0 and stats["shape"] == (256, 384) and stats["levels"] == 4
    for key in ("infer_s", "stitch_s", "write_s", "wait_s", "tissue_mpix", "tissue_mpix_per_s"):
        assert stats[key] >= 0
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob("canvas.*"))  # temp files gone


def test_restrict_to_tissue_and_out_of_order_batches(toy_slide, tmp_path):
    path, truth = toy_slide
    p = plan(path, model_mpp=1.0, tile_px=128, overlap=0.5)
    pred = SegmentPredictor(ColorNet(), device="cpu", output="probs", output_scale=0.5)
    table = p.tile_table()
    batches = []
    with open_any(path) as slide:
        for i in range(0, len(p.tiles), 5):
            tiles = p.tiles[i : i + 5]
            imgs = np.stack([px for _, px in iter_tile_pixels(slide, tiles, 128)])
            batches.append(pred({"image": imgs, **{k: v[i : i + 5] for k, v in table.items()}}))
    assert batches[0]["probs"].dtype == np.float16 and batches[0]["probs"].shape[-2:] == (64, 64)
    np.testing.assert_allclose(batches[0]["probs"].astype(np.float32).sum(1), 1.0, atol=2e-3)
    stats = stitch_and_write(
        path, batches[::-1], tmp_path, CLASSES, COLORS, output_mpp=2.0, tissue=p.tissue,
        write_overlay_png=False, tiff_tile=64,
    )  # fmt: skip
    got = tifffile.imread(tmp_path / "toy.mask.ome.tif")
    expected = truth[::4, ::4]
    agree = (got == expected).mean()
    assert agree > 0.999  # the dilated 8 µm/px tissue mask leaves the decision to the model
    assert not (got[expected == 0] > 0).any()  # nothing outside tissue
    assert "overlay" not in stats["paths"] and not (tmp_path / "toy.overlay.png").exists()

    # A model that calls everything class 1: only tissue (plus a one-mask-pixel margin) keeps it.
    always = [{**b, "probs": np.broadcast_to(np.array([0, 1, 0], np.float16)[:, None, None], b["probs"].shape[1:])[None].repeat(len(b["x"]), 0)} for b in batches]  # fmt: skip
    stitch_and_write(
        path, always, tmp_path, CLASSES, COLORS, output_mpp=2.0, tissue=p.tissue, write_overlay_png=False
    )
    got = tifffile.imread(tmp_path / "toy.mask.ome.tif")
    assert (got[expected > 0] == 1).all()
    margin = 2 * 16 / 4  # one 8 µm mask pixel = 16 level-0 px = 4 output px, either side
    ys, xs = np.nonzero(got)
    assert ys.min() >= 128 / 4 - margin and ys.max() < 896 / 4 + margin
    assert xs.min() >= 192 / 4 - margin and xs.max() < 1280 / 4 + margin
    assert (got == 0).sum() > 0.5 * got.size  # far glass is background even though tiles covered it


def test_plain_png_smaller_than_a_tile(tmp_path):
    img, truth = _toy(1024, 1536)
    small, small_truth = img[100:190:1, 150:250], truth[100:190, 150:250]  # 90 x 100, three classes
    png = tmp_path / "patch.png"
    cv2.imwrite(str(png), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    stats = segment_local(
        png, SegmentPredictor(ColorNet(), device="cpu"), tmp_path / "out", CLASSES, COLORS,
        model_mpp=0.5, tile_px=128, mpp_override=0.5, use_tissue=False,
    )  # fmt: skip
    got = tifffile.imread(tmp_path / "out" / "patch.mask.ome.tif")
    np.testing.assert_array_equal(got, small_truth)
    assert stats["n_tiles"] == 1
    with pytest.raises(Exception, match="mpp"):
        plan(png, model_mpp=0.5, tile_px=128)


_KILLED_CANVAS = """
import os, signal, sys
import numpy as np
from pbip_engine.engine.inference.stitch import Canvas
cv = Canvas(sys.argv[1], (64, 64), 3, chunk=32)
cv.add(0, 0, np.ones((3, 64, 64), np.float32))
for mm in cv._open.values():
    mm.flush()
print(cv.dir, flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # what the audit's killed segment got: no close, no clean-up
"""


def test_a_killed_runs_canvas_is_dropped_by_the_next_write_and_a_normal_run_leaves_none(tmp_path):
    import os
    import subprocess
    import sys

    img, truth = _toy(1024, 1536)
    png = tmp_path / "patch.png"
    cv2.imwrite(str(png), cv2.cvtColor(img[100:190, 150:250], cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's code
    r = subprocess.run([sys.executable, "-c", _KILLED_CANVAS, str(out / ".pbip-tmp")], capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    left = Path(r.stdout.strip())
    assert r.returncode != 0 and left.is_dir() and list(left.iterdir()), r.stdout + r.stderr
    (out / "canvas.notes").mkdir()  # a user's folder that merely looks like one stays
    segment_local(
        png, SegmentPredictor(ColorNet(), device="cpu"), out, CLASSES, COLORS,
        model_mpp=0.5, tile_px=128, mpp_override=0.5, use_tissue=False,
    )  # fmt: skip
    np.testing.assert_array_equal(tifffile.imread(out / "patch.mask.ome.tif"), truth[100:190, 150:250])
    assert not left.exists() and not (out / ".pbip-tmp").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["canvas.notes"]


@pytest.mark.slow
def test_tiny_model_overfit_then_segment(tmp_path):
    """Train a tiny CNN with the stage-2 training code on a toy image, then segment a new toy slide."""
    from pbip_engine.engine.training.loop import LoopConfig, fit_local
    from pbip_engine.engine.training.segmentation import SegmentationTask, iter_minibatches

    rng = np.random.default_rng(0)

    def textured(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        img, truth = _toy(h, w)
        noise = r.normal(0, 10, img.shape)
        return np.clip(img + noise, 0, 255).astype(np.uint8), truth

    img, truth = textured(1024, 1536, 1)
    small = cv2.resize(img, (384, 256), interpolation=cv2.INTER_AREA)  # 2 µm/px
    lab = truth[::4, ::4]
    crops = [(y, x) for y in range(0, 256 - 32, 16) for x in range(0, 384 - 32, 16)]
    X = np.stack([small[y : y + 32, x : x + 32] for y, x in crops])
    Y = np.stack([lab[y : y + 32, x : x + 32] for y, x in crops])
    Y[rng.random(Y.shape) < 0.05] = 255  # uncertain pixels are ignored, not learnt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    model.config = {"n_classes": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    cfg = LoopConfig(optimizer="adamw", lr=0.05, weight_decay=0.0, epochs=3, amp=False)
    res = fit_local(
        SegmentationTask(model), lambda e: iter_minibatches(X, Y, 32, seed=e), cfg, tmp_path / "train", log_fn=None,
    )  # fmt: skip
    hist = [h["loss"] for h in res["history"]]
    assert hist[-1] < hist[0] * 0.5

    slide_img, slide_truth = textured(1024, 1536, 2)
    path = write_slide(tmp_path / "new.tif", slide_img, mpp=0.5, n_levels=3, tile=64, compression="zlib")
    segment_local(
        path, SegmentPredictor(model, device="cpu"), tmp_path / "out", CLASSES, COLORS,
        model_mpp=2.0, tile_px=64, restrict_to_tissue=False, write_overlay_png=False, write_geojson=False,
    )  # fmt: skip
    got = tifffile.imread(tmp_path / "out" / "new.mask.ome.tif")
    assert (got == slide_truth[::4, ::4]).mean() > 0.97


def test_bad_tile_results_name_the_slide(toy_slide, tmp_path):
    path, _ = toy_slide
    bad = {"x": [0], "y": [0], "size0": [256], "logits": np.zeros((1, 5, 8, 8), np.float16)}
    with pytest.raises(SegmentError, match=r"toy\.tif.*5 channels, expected 3"):
        stitch_and_write(path, [bad], tmp_path, CLASSES, COLORS, output_mpp=2.0, restrict_to_tissue=False)
    with pytest.raises(SegmentError, match="logits"):
        stitch_and_write(
            path, [{"x": [0], "y": [0], "size0": [1]}], tmp_path, CLASSES, COLORS, restrict_to_tissue=False
        )
    assert not (tmp_path / "toy.mask.ome.tif").exists()


def test_real_glas_jpeg_as_one_level_slide(glas_dir, tmp_path):
    img = sorted((glas_dir / "images").glob("testA_1*.jpg"))[0]
    h, w = cv2.imread(str(img)).shape[:2]
    stats = segment_local(
        img, SegmentPredictor(ColorNet(), device="cpu"), tmp_path, CLASSES, COLORS,
        model_mpp=0.62, tile_px=256, overlap=0.25, mpp_override=0.62, use_tissue=False, write_overlay_png=False,
    )  # fmt: skip
    with tifffile.TiffFile(tmp_path / f"{img.stem}.mask.ome.tif") as tf:
        mask = tf.series[0].levels[0].asarray()
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1, 2}
    assert stats["n_tiles"] == len(grid_positions(w, 256, 192.0, "overhang")) * len(
        grid_positions(h, 256, 192.0, "overhang")
    )


@pytest.mark.slow
def test_real_svs_end_to_end(wsi_dir, tmp_path):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    if not svs.exists():
        pytest.skip(f"{svs} not present")
    stats = segment_local(
        svs, SegmentPredictor(ColorNet(), device="cpu"), tmp_path, CLASSES, COLORS,
        model_mpp=2.0, tile_px=128, batch_size=16,
    )  # fmt: skip
    with open_any(svs) as slide:
        w0, h0 = slide.dimensions
        r = 2.0 / slide.mpp
    assert stats["shape"] == (int(np.ceil(h0 / r)), int(np.ceil(w0 / r)))
    import tiffslide

    with tiffslide.TiffSlide(tmp_path / "CMU-1-Small-Region.mask.ome.tif") as ts:
        assert ts.dimensions == (stats["shape"][1], stats["shape"][0])
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
    gj = json.loads((tmp_path / "CMU-1-Small-Region.classes.geojson").read_text())
    for f in gj["features"]:
        geom = shape(f["geometry"])
        assert geom.is_valid and f["properties"]["classification"]["color"]
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= w0 + r and maxy <= h0 + r  # level-0 frame


def test_small_image_is_padded_by_reflection_not_glass(tmp_path):
    # Audit cause 9: 8 of 60 GlaS testA images are smaller than the inference tile and were framed in white.
    from pbip_engine.engine.wsi.tiling import TileSpec

    rng = np.random.default_rng(0)
    small = rng.integers(40, 190, (40, 50, 3), dtype=np.uint8)  # tissue-dark everywhere, no glass
    png = tmp_path / "small.png"
    cv2.imwrite(str(png), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    with open_any(png, 0.5) as slide:
        (_, px), *_ = list(iter_tile_pixels(slide, [TileSpec(0, 0, 64, 0, 64, 1.0)], 64))
    np.testing.assert_array_equal(px[:40, :50], small)
    assert px.max() < 200, "the pad shows artificial glass"
    np.testing.assert_array_equal(px, cv2.copyMakeBorder(small, 0, 24, 0, 14, cv2.BORDER_REFLECT_101))


def test_tta_averages_the_tile_and_its_mirrors():
    """TTA logits = mean of the tile's and its two mirrors' logits mapped back; a 1x1 model is unchanged."""
    torch.manual_seed(0)
    lopsided = nn.Conv2d(3, 3, 3, padding=1)  # not mirror-equivariant
    lopsided.config = {"n_classes": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    imgs = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    plain = SegmentPredictor(lopsided, device="cpu").predict(imgs).astype(np.float32)
    tta = SegmentPredictor(lopsided, device="cpu", tta=True).predict(imgs).astype(np.float32)

    def view(a, axis):
        return SegmentPredictor(lopsided, device="cpu").predict(np.ascontiguousarray(np.flip(a, axis)))

    expected = (plain + np.flip(view(imgs, 2), 3) + np.flip(view(imgs, 1), 2)) / 3
    np.testing.assert_allclose(tta, expected, atol=2e-2)
    assert np.abs(tta - plain).max() > 0.05  # the mirrors really were averaged in
    color = ColorNet()
    np.testing.assert_allclose(
        SegmentPredictor(color, device="cpu", tta=True).predict(imgs).astype(np.float32),
        SegmentPredictor(color, device="cpu").predict(imgs).astype(np.float32),
        atol=2e-2,
    )


def test_multi_scale_tta_adds_resized_views_and_keeps_the_tile_shape():
    """``tta`` as scales: the three views at each scale, resized back; a per-pixel model on a flat image
    gives the same answer at every scale, a 3x3 conv on a textured one does not."""
    color = ColorNet()
    flat = np.full((2, 16, 16, 3), 90, np.uint8)
    one = SegmentPredictor(color, device="cpu", tta=True).predict(flat).astype(np.float32)
    multi = SegmentPredictor(color, device="cpu", tta=(0.5, 1.0, 2.0)).predict(flat).astype(np.float32)
    assert multi.shape == one.shape
    np.testing.assert_allclose(multi, one, atol=2e-2)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    conv.config = {"n_classes": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    imgs = np.random.default_rng(1).integers(0, 255, (1, 16, 16, 3), dtype=np.uint8)
    a = SegmentPredictor(conv, device="cpu", tta=(0.5, 1.0)).predict(imgs)
    assert sorted(set(calls)) == [(8, 8), (16, 16)] and len(calls) == 6 and a.shape == (1, 3, 16, 16)
    with pytest.raises(SegmentError, match="TTA scales"):
        SegmentPredictor(conv, device="cpu", tta=(0.0,))
