"""Tissue detection: saturation + Otsu with a floor, physical-area filters, dark exclusion, QC output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from wsi_synth import he_like, write_pyramid

import pbip_engine  # noqa: F401  (before anything that imports torch)
from pbip_engine.engine.wsi.slides import SlideError, open_slide
from pbip_engine.engine.wsi.tissue import (
    QC_CONTOUR_RGB,
    TissueParams,
    detect_tissue,
    fill_small_holes,
    rasterize,
    remove_small_objects,
    tissue_from_geometry,
    tissue_mask_from_rgb,
    tissue_qc_png,
)


def test_blob_found_with_area_in_um2() -> None:
    img = he_like(200, 300, [(150, 100, 60)])
    mask, thr = tissue_mask_from_rgb(img, mpp=8.0, params=TissueParams(min_area_um2=0, min_hole_um2=0))
    disc = np.zeros((200, 300), np.uint8)
    cv2.circle(disc, (150, 100), 60, 1, -1)
    iou = (mask & (disc > 0)).sum() / (mask | (disc > 0)).sum()
    assert iou > 0.95
    assert 0.05 < thr < 0.9


def test_blank_slide_gives_no_tissue_thanks_to_floor() -> None:
    img = he_like(200, 300, [])  # white glass + noise: Otsu alone would split the noise
    mask, thr = tissue_mask_from_rgb(img, mpp=8.0, params=TissueParams())
    assert not mask.any()
    assert thr >= 0.05
    mask0, _ = tissue_mask_from_rgb(img, mpp=8.0, params=TissueParams(min_saturation=0.0, min_area_um2=0))
    assert mask0.any()  # the floor is what saves us


def test_small_objects_removed_by_physical_area() -> None:
    img = he_like(200, 300, [(100, 100, 50), (250, 50, 5)])  # big disc, speck of ~78 px
    p = TissueParams(close_radius=0, blur=1)
    keep_all, _ = tissue_mask_from_rgb(
        img, mpp=8.0, params=TissueParams(close_radius=0, blur=1, min_area_um2=0)
    )
    assert keep_all[50, 250]
    # At 8 µm/px the speck is ~5,000 µm² < 20,000 µm²: dropped; at 32 µm/px it is ~80,000 µm²: kept.
    assert not tissue_mask_from_rgb(img, mpp=8.0, params=p)[0][50, 250]
    assert tissue_mask_from_rgb(img, mpp=32.0, params=p)[0][50, 250]


def test_hole_filling_by_physical_area() -> None:
    m = np.zeros((100, 100), bool)
    m[10:90, 10:90] = True
    m[20:24, 20:24] = False  # 16 px hole
    m[40:70, 40:70] = False  # 900 px hole
    out = fill_small_holes(m, 100)
    assert out[21, 21] and not out[50, 50]
    assert out[0, 0] == m[0, 0]  # background touching the border is never a hole
    assert remove_small_objects(m, 10_000).sum() == 0
    assert remove_small_objects(m, 10).sum() == m.sum()


def test_dark_pen_excluded() -> None:
    img = he_like(200, 300, [(80, 100, 50)])
    cv2.line(img, (180, 20), (280, 180), (20, 20, 35), 12)  # black-blue ink
    base = {"min_area_um2": 0, "close_radius": 0}
    with_dark, _ = tissue_mask_from_rgb(img, 8.0, TissueParams(**base, exclude_dark=False))
    no_dark, _ = tissue_mask_from_rgb(img, 8.0, TissueParams(**base))
    assert with_dark[100, 230] and not no_dark[100, 230]
    assert no_dark[100, 80]


def test_fixed_threshold_overrides_otsu() -> None:
    img = he_like(100, 100, [(50, 50, 30)])
    _, thr = tissue_mask_from_rgb(img, 8.0, TissueParams(sat_threshold=0.3))
    assert thr == pytest.approx(0.3)


def test_detect_tissue_on_synthetic_slide(tmp_path: Path) -> None:
    img = he_like(1024, 1536, [(700, 500, 300)])
    p = write_pyramid(tmp_path / "s.tif", img, mpp=0.5, n_levels=4)
    with open_slide(p) as s:
        res = detect_tissue(s, TissueParams(target_mpp=4.0))
    assert res.downsample == pytest.approx(8.0)
    assert res.mask.shape == res.thumbnail.shape[:2] == (128, 192)
    assert res.mask_mpp == pytest.approx(4.0)
    true_um2 = np.pi * (300 * 0.5) ** 2
    assert res.area_um2 == pytest.approx(true_um2, rel=0.05)
    # Polygons are level-0 and enclose the same area as the mask.
    assert res.polygons.area * 0.5**2 == pytest.approx(res.area_um2, rel=0.02)
    cx, cy = res.polygons.centroid.coords[0]
    assert abs(cx - 700) < 10 and abs(cy - 500) < 10


def test_blank_slide_raises_no_tissue(tmp_path: Path) -> None:
    p = write_pyramid(tmp_path / "blank.tif", np.full((512, 512, 3), 245, np.uint8), mpp=0.5)
    with open_slide(p) as s, pytest.raises(SlideError) as ei:
        detect_tissue(s, TissueParams())
    assert ei.value.reason == "no_tissue"
    assert str(ei.value).startswith(str(p))


def test_qc_png_has_contour_and_is_atomic(tmp_path: Path) -> None:
    p = write_pyramid(tmp_path / "s.tif", he_like(1024, 1024, [(500, 500, 300)]), mpp=0.5, n_levels=4)
    with open_slide(p) as s:
        res = detect_tissue(s, TissueParams(target_mpp=4.0))
    out = tmp_path / "qc" / "s.tissue.png"
    tissue_qc_png(res, out)
    png = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert png.shape == res.thumbnail.shape
    green = np.all(png == np.array(QC_CONTOUR_RGB, np.uint8), axis=2)
    assert green.sum() > 100
    assert sorted(x.name for x in out.parent.iterdir()) == ["s.tissue.png"]  # no temp left
    tissue_qc_png(res, out, max_size=64)  # big slides: the QC image is capped
    assert max(cv2.imread(str(out)).shape[:2]) == 64


def test_rasterize_roundtrip_and_roi(tmp_path: Path) -> None:
    geom = shapely.box(80, 160, 400, 480).difference(shapely.box(160, 240, 240, 320))
    m = rasterize(geom, (64, 64), 8.0)
    assert m.sum() == (40 * 40) - (10 * 10)
    assert m[25, 15] and not m[35, 25]
    p = write_pyramid(tmp_path / "s.tif", he_like(512, 512, []), mpp=0.5)  # blank: detection would fail
    with open_slide(p) as s:
        res = tissue_from_geometry(s, geom, TissueParams(target_mpp=4.0))
        assert res.mask.sum() == m.sum()
        assert res.area_um2 == pytest.approx(m.sum() * 16.0)
        with pytest.raises(SlideError) as ei:
            tissue_from_geometry(s, shapely.Polygon(), TissueParams(target_mpp=4.0))
        assert ei.value.reason == "no_tissue"


def test_real_slide_tissue(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        res = detect_tissue(s, TissueParams())
    frac = res.mask.mean()
    assert 0.15 < frac < 0.6  # a strip of skin on glass
    assert res.polygons.is_valid
    w0, h0 = 2220, 2967
    minx, miny, maxx, maxy = res.polygons.bounds
    assert 0 <= minx < maxx <= w0 + 1 and 0 <= miny < maxy <= h0 + 1
