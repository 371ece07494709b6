"""Slide readers: backend choice, mpp resolution (and its pitfalls), bad files, overrides."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from wsi_synth import he_like, write_pyramid

import pbip_engine
from pbip_engine.engine.wsi.slides import (
    Slide,
    SlideError,
    lookup_by_slide,
    open_slide,
    read_mpp_overrides,
)

CMU_SVS = "CMU-1-Small-Region.svs"
CMU_TIF = "CMU-1-Small-Region.pyramid.tif"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
BACKENDS = ["cucim", "tiffslide"]


def _need(backend: str) -> None:
    if backend == "cucim" and not pbip_engine.CUCIM_AVAILABLE:
        pytest.skip("cuCIM not loaded in this process")


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    return write_pyramid(tmp_path / "synth.tif", he_like(256, 384, [(150, 120, 80)]), mpp=0.25)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "source"), [(CMU_SVS, "metadata:aperio"), (CMU_TIF, "metadata:tiff-resolution")]
)
def test_real_mpp_from_trusted_metadata(wsi_dir: Path, backend: str, name: str, source: str) -> None:
    _need(backend)
    with open_slide(wsi_dir / name, backends=(backend,)) as s:
        assert s.backend == backend
        # cuCIM's spacing() says 1.0 for the SVS: taking it would be off by 2x.
        assert s.mpp == pytest.approx(0.499, abs=1e-6)
        assert s.mpp_source == source
        assert s.level_dimensions[0] == (2220, 2967)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcga_without_mpp_refuses_then_override(wsi_dir: Path, backend: str) -> None:
    _need(backend)
    with pytest.raises(SlideError) as ei:
        open_slide(wsi_dir / TCGA, backends=(backend,))
    assert ei.value.reason == "no_mpp"
    msg = str(ei.value)
    assert msg.startswith(str(wsi_dir / TCGA))
    assert "slide,mpp" in msg  # says how to fix it
    with open_slide(wsi_dir / TCGA, mpp_override=0.5, backends=(backend,)) as s:
        assert (s.mpp, s.mpp_source) == (0.5, "override")
        assert s.level_count == 2
        assert s.best_level_for_downsample(2.0) == 1  # 2.0005 counts as 2x


def test_default_chain_prefers_cucim(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU_SVS) as s:
        assert s.backend == ("cucim" if pbip_engine.CUCIM_AVAILABLE else "tiffslide")


@pytest.mark.parametrize(("name", "override"), [(CMU_SVS, None), (CMU_TIF, None), (TCGA, 0.25)])
def test_backends_agree_on_pixels(wsi_dir: Path, name: str, override: float | None) -> None:
    _need("cucim")
    with (
        open_slide(wsi_dir / name, override, backends=("cucim",)) as a,
        open_slide(wsi_dir / name, override, backends=("tiffslide",)) as b,
    ):
        assert a.level_dimensions == b.level_dimensions
        np.testing.assert_allclose(a.level_downsamples, b.level_downsamples, rtol=1e-6)
        for level in range(a.level_count):
            w, h = a.level_dimensions[level]
            size = (min(300, w // 2), min(300, h // 2))
            loc = (int(w // 4 * a.level_downsamples[level]), int(h // 4 * a.level_downsamples[level]))
            ra, rb = a.read_region(loc, level, size), b.read_region(loc, level, size)
            assert ra.shape == rb.shape == (size[1], size[0], 3)
            assert ra.dtype == np.uint8
            assert ra.std() > 5  # real content, not a blank read
            assert np.abs(ra.astype(np.int16) - rb).mean() < 0.5  # measured: ≤ 2.3e-7 (JP2K), else 0


def test_thumbnail_and_scaled_read(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU_TIF) as s:
        th = s.thumbnail(300)
        assert max(th.shape[:2]) == 300 and th.shape[2] == 3
        assert th.shape[1] == round(2220 / (2967 / 300))
        assert s.best_level_for_downsample(8.0) == 3  # 8.0167 is within the 1 % slack
        assert s.best_level_for_downsample(7.0) == 2
        scaled = s.read_scaled(7.0)
        assert scaled.shape[:2] == (round(2967 / 7), round(2220 / 7))
        full = s.read_region((0, 0), 2, s.level_dimensions[2])
        ref = cv2.resize(full, (scaled.shape[1], scaled.shape[0]), interpolation=cv2.INTER_AREA)
        assert np.abs(ref.astype(np.int16) - scaled).mean() < 1.0


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.svs"
    with pytest.raises(SlideError) as ei:
        open_slide(p)
    assert ei.value.reason == "missing"
    assert str(ei.value).startswith(str(p))


def test_text_file_renamed_svs(tmp_path: Path) -> None:
    p = tmp_path / "fake.svs"
    p.write_text("slide_id,label\nthis is not a slide\n")
    with pytest.raises(SlideError) as ei:
        open_slide(p)
    assert ei.value.reason == "unreadable"
    assert str(ei.value).startswith(str(p))
    assert "tiffslide" in str(ei.value)  # every backend's error is reported


def test_truncated_svs(wsi_dir: Path, tmp_path: Path) -> None:
    data = (wsi_dir / CMU_SVS).read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: int(len(data) * 0.4)])
    with pytest.raises(SlideError) as ei:
        open_slide(p)
    assert ei.value.reason == "unreadable"
    assert str(ei.value).startswith(str(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tiles_fail_at_read_region(tmp_path: Path, backend: str) -> None:
    """IFDs at the start, pixel data cut: opens (and probes) fine, reading the lost tiles fails clearly."""
    _need(backend)
    img = he_like(512, 512, [(256, 256, 240)])
    p = write_pyramid(tmp_path / "cut.tif", img, mpp=0.5, n_levels=1, tile=128)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.75)])  # tiles 0-10 of 16 survive
    with open_slide(p, backends=(backend,)) as s:
        assert s.read_region((128, 128), 0, (128, 128)).shape == (128, 128, 3)
        with pytest.raises(SlideError) as ei:
            s.read_region((384, 384), 0, (128, 128))
    assert ei.value.reason == "read_failed"
    msg = str(ei.value)
    assert msg.startswith(str(p)) and "x=384 y=384" in msg


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "slide.mrxs"
    p.write_bytes(b"\0" * 10)
    with pytest.raises(SlideError) as ei:
        open_slide(p)
    assert ei.value.reason == "unsupported_format"


def test_unknown_backend_is_a_programming_error(synth: Path) -> None:
    with pytest.raises(ValueError, match="openslide"):
        open_slide(synth, backends=("openslide",))


def test_bad_override(synth: Path) -> None:
    with pytest.raises(SlideError) as ei:
        open_slide(synth, mpp_override=-1.0)
    assert ei.value.reason == "bad_mpp"


# ---------------------------------------------------------------------------------- synthetic slides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit", ["CENTIMETER", "INCH"])
def test_resolution_tags_with_units(tmp_path: Path, backend: str, unit: str) -> None:
    _need(backend)
    p = write_pyramid(tmp_path / "s.tif", he_like(128, 128, [(64, 64, 40)]), mpp=0.3, resolution_unit=unit)
    with open_slide(p, backends=(backend,)) as s:
        assert s.mpp == pytest.approx(0.3, rel=1e-5)
        assert s.mpp_source == "metadata:tiff-resolution"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_without_unit_is_not_an_mpp(tmp_path: Path, backend: str) -> None:
    _need(backend)
    p = write_pyramid(tmp_path / "s.tif", he_like(128, 128, [(64, 64, 40)]), mpp=None)
    with pytest.raises(SlideError) as ei:
        open_slide(p, backends=(backend,))
    assert ei.value.reason == "no_mpp"


def test_cucim_flag_respected(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pbip_engine, "CUCIM_AVAILABLE", False)
    with open_slide(synth) as s:
        assert s.backend == "tiffslide"
    with pytest.raises(SlideError) as ei:
        open_slide(synth, backends=("cucim",))
    assert "cuCIM not loaded" in str(ei.value)


def test_pixels_levels_and_best_level(synth: Path) -> None:
    img = he_like(256, 384, [(150, 120, 80)])
    with open_slide(synth) as s:
        assert s.level_dimensions == [(384, 256), (192, 128), (96, 64)]
        assert [s.best_level_for_downsample(d) for d in (0.5, 1, 1.9, 2, 3.9, 3.99, 100)] == [
            0,
            0,
            0,
            1,
            1,
            2,
            2,
        ]
        assert s.level_mpp(2) == pytest.approx(1.0)
        r = s.read_region((32, 16), 0, (100, 50))
        assert r.shape == (50, 100, 3)
        assert np.abs(r.astype(np.int16) - img[16:66, 32:132]).mean() < 6  # JPEG q75 default
        with pytest.raises(SlideError) as ei:
            s.read_region((0, 0), 5, (10, 10))
        assert ei.value.reason == "read_failed"


def test_not_picklable_and_closes(synth: Path) -> None:
    s = open_slide(synth)
    with pytest.raises(TypeError, match="open_slide"):
        pickle.dumps(s)
    with s:
        pass
    with pytest.raises(SlideError) as ei:
        s.read_region((0, 0), 0, (8, 8))
    assert ei.value.reason == "closed"
    s.close()  # idempotent


def test_slide_error_pickles() -> None:
    e = pickle.loads(pickle.dumps(SlideError("/x/a.svs", "no_tissue", "no tissue")))
    assert (e.reason, str(e), e.path) == ("no_tissue", "/x/a.svs: no tissue", Path("/x/a.svs"))


def test_slide_is_a_plain_dataclass_of_metadata(synth: Path) -> None:
    with open_slide(synth) as s:
        assert isinstance(s, Slide)
        assert s.path == synth and s.dimensions == (384, 256)


# ------------------------------------------------------------------------------------ override CSV


def test_read_mpp_overrides(tmp_path: Path) -> None:
    p = tmp_path / "mpp.csv"
    p.write_text("slide,mpp\ntcga-cr-7395-01a-01-ts1.svs,0.2520\n# comment\n\nother,0.5\n")
    table = read_mpp_overrides(p)
    assert table == {"tcga-cr-7395-01a-01-ts1.svs": 0.252, "other": 0.5}
    assert lookup_by_slide(table, "/data/tcga-cr-7395-01a-01-ts1.svs") == 0.252
    assert lookup_by_slide(table, "/data/other.svs") == 0.5  # by stem
    assert lookup_by_slide(table, "/data/third.svs") is None


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("slide,mpp\na.svs,0.5\nb.svs,abc\n", ":3:"),
        ("slide,mpp\na.svs,0.5\na.svs,0.25\n", ":3:"),
        ("slide,micron\na.svs,0.5\n", ":1:"),
        ("slide,mpp\na.svs\n", ":2:"),
        ("slide,mpp\na.svs,0\n", ":2:"),
    ],
)
def test_read_mpp_overrides_errors_name_file_and_line(tmp_path: Path, text: str, where: str) -> None:
    p = tmp_path / "mpp.csv"
    p.write_text(text)
    with pytest.raises(ValueError) as ei:
        read_mpp_overrides(p)
    assert str(ei.value).startswith(f"{p}{where}")
