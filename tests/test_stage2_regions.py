"""Stage 2 on crops of stitched regions (issue 15 item 1): regions, crops, the spec and the model card."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pbip_engine.engine.pseudo.regions import IGNORE, stitched_regions
from pbip_engine.engine.training.region_crops import RegionCrops, centre_crop, pad_to
from pbip_engine.schemas.spec import SpecError, parse_spec


def _grid(step0: int = 50, size0: int = 100, tile: int = 50, nx: int = 4, ny: int = 2):
    """Overlapping tiles (stride half a tile) whose image value and mask encode the level-0 position."""
    xs, ys, s0, imgs, msks = [], [], [], [], []
    for y in range(0, ny * step0, step0):
        for x in range(0, nx * step0, step0):
            xs.append(x), ys.append(y), s0.append(size0)
            yy, xx = np.mgrid[0:tile, 0:tile] * (size0 / tile)
            img = np.zeros((tile, tile, 3), np.uint8)
            img[..., 0] = ((x + xx) // 10).astype(np.uint8)
            img[..., 1] = ((y + yy) // 10).astype(np.uint8)
            imgs.append(img)
            msks.append(np.where(x + xx < 120, 1, 2).astype(np.uint8))
    return xs, ys, s0, imgs, msks


def test_regions_paste_the_tiles_back_at_their_positions():
    xs, ys, s0, imgs, msks = _grid()
    (whole,) = stitched_regions(xs, ys, s0, imgs, msks, region_px=512)
    assert (whole.x, whole.y, whole.width0, whole.height0) == (0, 0, 250, 150)
    assert whole.image.shape == (75, 125, 3) and whole.mask.shape == (75, 125)  # tile scale 0.5
    yy, xx = np.mgrid[0:75, 0:125] * 2
    np.testing.assert_array_equal(whole.image[..., 0], (xx // 10).astype(np.uint8))
    np.testing.assert_array_equal(whole.image[..., 1], (yy // 10).astype(np.uint8))
    np.testing.assert_array_equal(whole.mask, np.where(xx < 120, 1, 2))
    parts = stitched_regions(xs, ys, s0, imgs, msks, region_px=48)
    assert len(parts) == 3 * 2 and all(max(p.mask.shape) <= 48 for p in parts)
    assert sum(p.mask.size for p in parts) == whole.mask.size  # a partition, no overlap, no sliver


def test_uncovered_pixels_are_ignored_and_empty_regions_dropped():
    xs, ys, s0, imgs, msks = _grid(nx=1, ny=1)
    far = [500], [0], [100], [imgs[0]], [msks[0]]
    regions = stitched_regions(xs + far[0], ys + far[1], s0 + far[2], imgs + far[3], msks + far[4], 128)
    assert len(regions) == 2  # the empty middle of the canvas is not a region
    covered = sum(int((r.mask != IGNORE).sum()) for r in regions)
    assert covered == 2 * 50 * 50 and all((r.mask == IGNORE).any() or r.mask.size == 2500 for r in regions)


def _rows(n: int = 3, h: int = 40, w: int = 70) -> dict:
    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None]
    msk = (1 + (np.arange(w)[None].repeat(h, 0) >= w // 2)).astype(np.uint8)
    return {
        "tile_id": np.array([f"s/r{i}" for i in range(n)], dtype=object),
        "image": np.array([png(img)] * n, dtype=object),
        "mask": np.array([png(msk)] * n, dtype=object),
    }


def test_region_crops_are_fixed_size_random_and_reproducible():
    rows = _rows()
    a = RegionCrops(32, (0.75, 2.0), seed=3)(rows)
    assert a["image"].shape == (3, 32, 32, 3) and a["image"].dtype == np.uint8
    assert a["mask"].shape == (3, 32, 32) and set(np.unique(a["mask"])) <= {1, 2, IGNORE}
    b = RegionCrops(32, (0.75, 2.0), seed=3)(rows)
    np.testing.assert_array_equal(a["image"], b["image"])  # the seed fixes the crops
    c = RegionCrops(32, (0.75, 2.0), seed=4)(rows)
    assert not np.array_equal(a["image"], c["image"])
    # zoom 2: a crop covers 16 source px, so neighbouring output columns repeat source columns
    z = RegionCrops(32, (2.0, 2.0), jitter=0, seed=0)(rows)
    assert np.ptp(z["image"][0, 0, :, 0].astype(int)) <= 16


def test_small_regions_are_padded_with_ignored_pixels_not_stretched():
    rows = _rows(n=1, h=10, w=12)
    out = RegionCrops(32, (1.0, 1.0), jitter=0, seed=0)(rows)
    assert (out["mask"] == IGNORE).mean() > 0.8  # 120 real of 1024 px
    img, msk = pad_to(np.zeros((10, 12, 3), np.uint8), np.ones((10, 12), np.uint8), 16)
    assert msk.shape == (16, 16) and (msk[10:] == IGNORE).all() and (img[10:] == 255).all()


def test_validation_crops_are_centred_and_unjittered():
    rows = _rows(n=2)
    crops = RegionCrops(32, seed=0)
    v1, v2 = crops.validation(rows), crops.validation(rows)
    np.testing.assert_array_equal(v1["image"], v2["image"])
    assert v1["image"][0, 0, 0, 0] == (70 - 32) // 2  # column index encoded in the red channel
    i, m = centre_crop(np.zeros((5, 5, 3), np.uint8), np.ones((5, 5), np.uint8), 8)
    assert i.shape == (8, 8, 3) and (m == IGNORE).sum() == 64 - 25


def _spec(tmp_path, **sections):
    raw = {"run": {"name": "t", "output": "o"}, "data": {"synthetic": {"slides": 1}},
           "classes": [{"name": "a", "color": [200, 0, 0]}], **sections}  # fmt: skip
    return parse_spec(raw, tmp_path)


def test_crop_px_needs_stitched_regions_and_a_sane_zoom(tmp_path):
    with pytest.raises(SpecError, match=r"segmenter\.crop_px.*pseudo\.stitch"):
        _spec(tmp_path, segmenter={"crop_px": 256}, pseudo={"stitch": False})
    with pytest.raises(SpecError, match=r"segmenter\.zoom"):
        _spec(tmp_path, segmenter={"crop_px": 256, "zoom": [2.0, 1.0]})
    assert _spec(tmp_path).segmenter.crop_px is None  # default: the tiles, as before


def test_inference_context_is_the_crop_stage_2_trained_on(tmp_path):
    from pbip_engine.engine.inference.cohort import inference_tile_px
    from pbip_engine.jobs.rundir import model_card

    spec = _spec(tmp_path, tiling={"tile_px": 112}, segmenter={"crop_px": 256})
    assert inference_tile_px(model_card(spec, "deeplabv3plus")) == 256
    assert inference_tile_px(model_card(_spec(tmp_path, tiling={"tile_px": 112}), "deeplabv3plus")) == 112


def test_pseudo_stage_writes_each_slides_regions(tmp_path):
    """``stitch_slide`` (the pseudo stage's per-slide function, Ray-free) leaves regions/<slide>.parquet
    whose mask agrees with the tiles' stitched masks."""
    from pbip_engine.engine.ingest.tile_slide import encode_jpeg
    from pbip_engine.engine.pseudo.stitch import encode_cam
    from pbip_engine.engine.training.batches import decode_masks
    from pbip_engine.jobs.pseudo import stitch_slide
    from pbip_engine.jobs.rundir import REGIONS

    spec = _spec(tmp_path, pseudo={"background": "none", "region_px": 512, "image_prototypes": 0},
                 classes=[{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}])  # fmt: skip
    cam = np.zeros((2, 8, 8), np.float32)
    cam[0, :, :4], cam[1, :, 4:] = 1.0, 1.0  # left a, right b
    batch = {
        "tile_id": np.array(["s:0_0", "s:8_0"], dtype=object),
        "slide_id": np.array(["s", "s"], dtype=object),
        "x": np.array([0, 8]), "y": np.array([0, 0]), "size0": np.array([8, 8]),
        "labels": np.array([[1, 1], [1, 1]], np.uint8),
        "image": np.array([encode_jpeg(np.full((8, 8, 3), 120, np.uint8), 90)] * 2, dtype=object),
        "cam": np.array([encode_cam(cam)] * 2, dtype=object),
    }  # fmt: skip
    rows = stitch_slide(batch, spec, str(tmp_path))
    table = pq.read_table(tmp_path / REGIONS / "s.parquet").to_pylist()
    assert len(table) == 1 and (table[0]["width0"], table[0]["height0"]) == (16, 8)
    assert (table[0]["width"], table[0]["height"]) == (16, 8)  # px at tiling.mpp: the 8-px tiles side by side
    (mask,) = decode_masks([table[0]["mask"]])
    tiles = decode_masks(list(rows["mask"]))
    np.testing.assert_array_equal(mask, np.concatenate(list(tiles), axis=1))
    assert set(np.unique(mask)) == {1, 2}


def test_tta_scales_reach_the_predictor_option(tmp_path):
    assert _spec(tmp_path).segment.tta_option is True  # mirrors at scale 1: the default
    assert _spec(tmp_path, segment={"tta_scales": [0.75, 1, 1.25]}).segment.tta_option == (0.75, 1.0, 1.25)
    assert _spec(tmp_path, segment={"tta": False, "tta_scales": [0.5, 1]}).segment.tta_option is False
    with pytest.raises(SpecError, match=r"tta_scales"):
        _spec(tmp_path, segment={"tta_scales": [0, 1]})
