"""What QuPath sees: masks and overlays opened by Bio-Formats (QuPath's reader) as OME-TIFF pyramids.

End to end through the segment writer with a non-ASCII slide and class name (a name outside 7-bit ASCII
used to make every mask write fail), then read back by Bio-Formats' ``ImageInfo``, tifffile and tiffslide.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import tiffslide
import torch
from bioformats_info import OME_NS, image_info
from test_segment_slide import ColorNet, _toy
from wsi_synth import write_pyramid as write_slide

import pbip_engine
from pbip_engine.engine.inference.segment_slide import SegmentPredictor, segment_local
from pbip_engine.engine.outputs.tiff_writer import read_label_classes, write_pyramid

SLIDE = "ünïcødé_切片"
CLASSES = ["nécrose", "Stroma"]
COLORS = [(200, 0, 0), (0, 0, 200)]


@pytest.fixture(autouse=True)
def _tiffslide_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pbip_engine, "CUCIM_AVAILABLE", False)  # see test_segment_slide


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("qupath")
    img, truth = _toy(1024, 1536)
    slide = write_slide(d / f"{SLIDE}.tif", img, mpp=0.5, n_levels=3, tile=64, compression="zlib")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = segment_local(
            slide, SegmentPredictor(ColorNet(), device="cpu"), d / "out", CLASSES, COLORS, model_mpp=1.0,
            tile_px=128, output_mpp=2.0, batch_size=8, restrict_to_tissue=False, tiff_tile=64,
            pyramid_min_size=64, overlay_max_px=1024,
        )  # fmt: skip
    finally:
        torch.set_num_threads(n)
    return d / "out", truth, stats


def _bioformats_pyramid(stats: dict, kind: str, path, levels: int, mpp: float):
    """Bio-Formats' view of ``path``: the OME-TIFF reader (not the flat plain-TIFF one), every level, µm."""
    assert stats["paths"][kind] == str(path)
    info = image_info(path)
    assert info.reader == "OME-TIFF", info.text[:1500]  # plain TIFF reader = one level, XML as text
    assert info.resolutions == levels
    px = info.pixels()
    assert float(px.get("PhysicalSizeX")) == pytest.approx(mpp)
    assert float(px.get("PhysicalSizeY")) == pytest.approx(mpp)
    assert px.get("PhysicalSizeXUnit") == "µm"
    return info, px


@pytest.mark.slow
def test_mask_opens_in_bioformats_as_ome_pyramid_with_unicode_names(segmented):
    out, truth, stats = segmented
    mask = out / f"{SLIDE}.mask.ome.tif"
    info, px = _bioformats_pyramid(stats, "mask", mask, 4, 2.0)  # (256, 384) -> ... -> (32, 48)
    assert (px.get("SizeX"), px.get("SizeY")) == ("384", "256")
    assert px.find("o:Channel", OME_NS).get("Name") == "labels"
    assert info.ome.find("o:Image", OME_NS).get("Name") == f"{SLIDE}.mask.ome.tif"
    names = [m.text for m in info.ome.iterfind(".//o:MapAnnotation/o:Value/o:M", OME_NS)]
    assert "nécrose" in names
    # The other readers still agree.
    assert read_label_classes(mask) == list(zip(CLASSES, COLORS, strict=True))
    with tifffile.TiffFile(mask) as tf:
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), truth[::4, ::4])
        assert len(tf.series[0].levels) == 4
    with tiffslide.TiffSlide(mask) as ts:
        assert ts.level_count == 4 and float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
    gj = json.loads((out / f"{SLIDE}.classes.geojson").read_text(encoding="utf-8"))
    assert {f["properties"]["classification"]["name"] for f in gj["features"]} == set(CLASSES)


@pytest.mark.slow
def test_overlay_pyramid_lines_up_with_the_slide(segmented):
    out, _, stats = segmented
    ov = out / f"{SLIDE}.overlay.ome.tif"
    # 1536 level-0 px at 0.5 µm shown in 1024 px: 0.75 µm/px, so it covers the slide in QuPath;
    # levels (683, 1024) -> (342, 512) -> (171, 256).
    _, px = _bioformats_pyramid(stats, "overlay_tiff", ov, 3, 0.75)
    assert (px.get("SizeX"), px.get("SizeC")) == ("1024", "3")
    with tifffile.TiffFile(ov) as tf:
        rgb = tf.series[0].levels[0].asarray()
    assert rgb.shape == (683, 1024, 3)
    # Inside the red rectangle (class 1) the blend leans to the class colour; glass stays grey.
    r, _, b = rgb[150, 300].astype(int)
    assert r > b + 60 and abs(int(rgb[20, 20, 0]) - 240) < 12


def test_non_ascii_names_in_every_tiff_kind(tmp_path):
    """OME labels and RGB, and the plain (JSON description) labels: none refuses a non-ASCII name."""
    lab = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) % 3, np.ones((32, 32), np.uint8))
    for ome in (True, False):
        p = tmp_path / f"{SLIDE}.{int(ome)}.tif"
        write_pyramid(
            p, lab, lab.shape, 0.5, kind="labels", tile=32, min_size=32, ome=ome,
            class_names=["nécrose", 'a "quoted" <tag> & 切片'], class_colors=[(1, 2, 3), (4, 5, 6)],
        )  # fmt: skip
        assert read_label_classes(p) == [("nécrose", (1, 2, 3)), ('a "quoted" <tag> & 切片', (4, 5, 6))]
        with tifffile.TiffFile(p) as tf:
            assert tf.pages[0].software == "pbip-engine"  # ASCII tags stay ASCII
            np.testing.assert_array_equal(tf.pages[0].asarray(), lab)
    rgb = np.full((96, 128, 3), 200, np.uint8)
    write_pyramid(tmp_path / f"{SLIDE}.ome.tif", rgb, rgb.shape[:2], 0.5, kind="rgb", tile=32, ome=True)
    assert tifffile.TiffFile(tmp_path / f"{SLIDE}.ome.tif").is_ome
