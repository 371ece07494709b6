"""Streaming pyramidal TIFF writer: layouts, mpp round trips through every reader, label reduction."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
import tiffslide

import pbip_engine
from pbip_engine.engine.outputs.tiff_writer import (
    OME_NS_COLORS,
    OME_NS_NAMES,
    TiffWriterError,
    downsample_labels_mode,
    pyramid_shapes,
    read_label_classes,
    write_pyramid,
)

OME_NS = {"o": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth test image (JPEG keeps it within a few grey levels) with some per-channel structure."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 6, 3)
    img = np.stack([127 + 100 * np.sin(xx / 37 + ph[c]) * np.cos(yy / 53 + ph[c]) for c in range(3)], -1)
    return img.astype(np.uint8)


def blocky_labels(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 5, (h // 8 + 1, w // 8 + 1)).astype(np.uint8)
    return np.kron(small, np.ones((8, 8), np.uint8))[:h, :w]


def test_pyramid_shapes_halve_until_min_size():
    assert pyramid_shapes((1500, 1300), 256) == [(1500, 1300), (750, 650), (375, 325), (188, 163)]
    assert pyramid_shapes((200, 100), 512) == [(200, 100)]
    assert pyramid_shapes((513, 10), 512) == [(513, 10), (257, 5)]
    with pytest.raises(ValueError):
        pyramid_shapes((0, 5))


def test_mode_downsampling_hand_made():
    a = np.array(
        [
            [1, 1, 0, 2, 3, 4],
            [1, 0, 2, 0, 5, 6],
            [0, 0, 4, 4, 7, 7],
            [0, 3, 4, 1, 7, 7],
        ],
        np.uint8,
    )
    # blocks: {1,1,1,0}->1 ; {0,2,2,0} tie 2-2 -> larger 2 ; {3,4,5,6} all distinct -> largest 6
    #         {0,0,0,3}->0 (majority beats larger) ; {4,4,4,1}->4 ; {7,7,7,7}->7
    assert downsample_labels_mode(a).tolist() == [[1, 2, 6], [0, 4, 7]]
    # odd sizes: edge replicated, ceil(h/2) x ceil(w/2)
    b = np.array([[5, 0, 0], [5, 5, 0], [2, 2, 0]], np.uint8)
    assert downsample_labels_mode(b).tolist() == [[5, 0], [2, 0]]


def test_rgb_roundtrip_tifffile_tiffslide(tmp_path):
    img = smooth_rgb(700, 900)
    calls: list[tuple[int, int, int, int]] = []

    def source(x, y, w, h):
        calls.append((x, y, w, h))
        return img[y : y + h, x : x + w]

    p = tmp_path / "slide.tif"
    shapes = write_pyramid(p, source, img.shape[:2], 0.25, kind="rgb", tile=128, min_size=128)
    assert shapes == [(700, 900), (350, 450), (175, 225), (88, 113)]
    # streamed: one call per level-0 tile, row-major, edge tiles clipped to the image
    assert len(calls) == 6 * 8 and calls[0] == (0, 0, 128, 128) and calls[7] == (896, 0, 4, 128)
    assert calls == sorted(calls, key=lambda c: (c[1], c[0]))
    with tifffile.TiffFile(p) as tf:
        assert len(tf.pages) == len(shapes)
        for k, (page, s) in enumerate(zip(tf.pages, shapes, strict=True)):
            assert page.shape == (*s, 3) and page.dtype == np.uint8
            assert page.is_tiled and page.tilewidth == 128 and page.tilelength == 128
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (0 if k == 0 else 1)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(1e4 / (0.25 * 2**k), rel=1e-6)
        assert not tf.pages[0].subifds  # layout B: top-level IFDs only
        back = tf.pages[0].asarray()
        assert np.abs(back.astype(int) - img).mean() < 3
        lvl1 = tf.pages[1].asarray().astype(int)
        ref1 = img.reshape(350, 2, 450, 2, 3).mean((1, 3))
        assert np.abs(lvl1 - ref1).mean() < 3  # area mean, not decimation
    s = tiffslide.TiffSlide(p)
    try:
        assert s.level_count == 4
        assert s.level_dimensions == ((900, 700), (450, 350), (225, 175), (113, 88))
        assert s.properties["tiffslide.mpp-x"] == pytest.approx(0.25)
        assert s.properties["tiffslide.mpp-y"] == pytest.approx(0.25)
        region = s.read_region((300, 200), 0, (64, 64), as_array=True)
        assert np.abs(region.astype(int) - img[200:264, 300:364]).mean() < 4
    finally:
        s.close()


def test_rgb_readable_by_cucim(tmp_path):
    if not pbip_engine.CUCIM_AVAILABLE:
        pytest.skip("cuCIM not importable in this process")
    from cucim import CuImage

    img = smooth_rgb(600, 520, seed=3)
    p = tmp_path / "slide.tif"
    write_pyramid(p, img, img.shape[:2], 0.5, kind="rgb", tile=128, min_size=128)
    c = CuImage(str(p))
    assert c.resolutions["level_count"] == 4
    assert tuple(map(tuple, c.resolutions["level_dimensions"])) == (
        (520, 600),
        (260, 300),
        (130, 150),
        (65, 75),
    )
    assert c.spacing()[:2] == pytest.approx([0.5, 0.5])
    assert c.spacing_units()[:2] == ["micrometer", "micrometer"]
    region = np.asarray(c.read_region((100, 150), (64, 64), 0))
    assert np.abs(region.astype(int) - img[150:214, 100:164]).mean() < 4


def test_labels_lossless_mode_reduced_and_readable(tmp_path):
    lab = blocky_labels(530, 410)
    lab[100:103, :] = 3  # a thin structure
    p = tmp_path / "mask.tif"
    names = ["tumour", "stroma", "lymphocytes", "necrosis"]
    shapes = write_pyramid(p, lab, lab.shape, 0.5, kind="labels", tile=64, min_size=100, class_names=names)
    with tifffile.TiffFile(p) as tf:
        pages = [pg.asarray() for pg in tf.pages]
        assert all(pg.compression == tifffile.COMPRESSION.ADOBE_DEFLATE for pg in tf.pages)
        assert tf.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
    assert [pg.shape for pg in pages] == shapes and len(shapes) == 4
    np.testing.assert_array_equal(pages[0], lab)
    ref = lab
    for k in range(1, len(shapes)):
        ref = downsample_labels_mode(ref)
        np.testing.assert_array_equal(pages[k], ref)
        assert set(np.unique(pages[k])) <= set(np.unique(lab))
    assert read_label_classes(p) == [(n, None) for n in names]
    s = tiffslide.TiffSlide(p)
    try:
        assert s.level_count == 4 and s.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
    finally:
        s.close()


def test_spilled_levels_are_byte_identical(tmp_path):
    lab = blocky_labels(700, 650, seed=2)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    write_pyramid(a, lab, lab.shape, 0.5, kind="labels", tile=64, min_size=64)
    write_pyramid(b, lab, lab.shape, 0.5, kind="labels", tile=64, min_size=64, spill_bytes=0)
    assert a.read_bytes() == b.read_bytes()
    img = smooth_rgb(300, 500)
    write_pyramid(a, img, img.shape[:2], 0.5, kind="rgb", tile=64, min_size=64)
    write_pyramid(b, img, img.shape[:2], 0.5, kind="rgb", tile=64, min_size=64, spill_bytes=0)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.tif", "b.tif"]  # no spill files left


def test_ome_labels_subifds_and_metadata(tmp_path):
    lab = blocky_labels(400, 300, seed=1)
    p = tmp_path / "mask.ome.tif"
    names = ["tumour", "stroma & co", "lymphocytes", "necrosis"]
    colors = [(200, 40, 40), (240, 130, 190), (60, 60, 200), (150, 120, 40)]
    shapes = write_pyramid(
        p,
        lab,
        lab.shape,
        0.4,
        kind="labels",
        tile=64,
        min_size=64,
        ome=True,
        class_names=names,
        class_colors=colors,
    )
    with tifffile.TiffFile(p) as tf:
        assert tf.is_ome
        assert len(tf.pages) == 1 and len(tf.pages[0].subifds) == len(shapes) - 1
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == shapes
        np.testing.assert_array_equal(levels[0].asarray(), lab)
        np.testing.assert_array_equal(levels[1].asarray(), downsample_labels_mode(lab))
        root = ET.fromstring(tf.pages[0].description)
    pixels = root.find("o:Image/o:Pixels", OME_NS)
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(0.4)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(0.4)
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    assert (pixels.get("SizeX"), pixels.get("SizeY"), pixels.get("Type")) == ("300", "400", "uint8")
    maps = {
        ma.get("Namespace"): {e.get("K"): e.text for e in ma.iterfind("o:Value/o:M", OME_NS)}
        for ma in root.iterfind(".//o:StructuredAnnotations/o:MapAnnotation", OME_NS)
    }
    assert maps[OME_NS_NAMES]["0"] == "background" and maps[OME_NS_NAMES]["2"] == "stroma & co"
    assert maps[OME_NS_COLORS]["1"] == "#c82828"
    assert read_label_classes(p) == list(zip(names, colors, strict=True))


def test_deterministic_bytes(tmp_path):
    img = smooth_rgb(300, 300)
    write_pyramid(tmp_path / "a.tif", img, img.shape[:2], 0.5, kind="rgb", tile=64, min_size=64)
    write_pyramid(tmp_path / "b.tif", img, img.shape[:2], 0.5, kind="rgb", tile=64, min_size=64)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_refuses_lossy_labels_and_bad_args(tmp_path):
    lab = blocky_labels(64, 64)
    with pytest.raises(TiffWriterError, match="lossy"):
        write_pyramid(tmp_path / "m.tif", lab, lab.shape, 0.5, kind="labels", compression="jpeg")
    with pytest.raises(TiffWriterError, match="multiple of 16"):
        write_pyramid(tmp_path / "m.tif", lab, lab.shape, 0.5, kind="labels", tile=100)
    with pytest.raises(TiffWriterError, match="mpp"):
        write_pyramid(tmp_path / "m.tif", lab, lab.shape, 0.0, kind="labels")
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_nothing_and_keeps_old_file(tmp_path):
    p = tmp_path / "slide.tif"
    p.write_bytes(b"previous version")
    img = smooth_rgb(600, 600)

    def failing(x, y, w, h):
        if y >= 256:
            raise RuntimeError("reader died")
        return img[y : y + h, x : x + w]

    with pytest.raises(RuntimeError, match="reader died"):
        write_pyramid(p, failing, (600, 600), 0.5, kind="rgb", tile=128, min_size=64, spill_bytes=0)
    assert p.read_bytes() == b"previous version"
    assert [x.name for x in tmp_path.iterdir()] == ["slide.tif"]

    q = tmp_path / "bad.tif"
    with pytest.raises(TiffWriterError, match=r"bad\.tif.*shape"):
        write_pyramid(q, lambda x, y, w, h: np.zeros((h, w), np.uint8), (300, 300), 0.5, kind="rgb", tile=128)
    with pytest.raises(TiffWriterError, match="outside uint8"):
        write_pyramid(q, lambda x, y, w, h: np.full((h, w), 300, np.int32), (300, 300), 0.5, kind="labels")
    assert [x.name for x in tmp_path.iterdir()] == ["slide.tif"]
