"""jobs.infer.segment_slides: one reader -> predictor pipeline for a whole cohort, slide failures apart.

The model is the fixed colour -> class 1x1 convolution of test_segment_slide (glass 0, red 1, blue 2),
swapped in where the stage would load the trained segmenter, so expected masks are known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from test_segment_slide import CLASSES, COLORS, ColorNet, _toy
from wsi_synth import write_pyramid

import pbip_engine
import pbip_engine.engine.inference.segment_slide as seg_engine
from pbip_engine.engine.inference.cohort import _by_slide
from pbip_engine.jobs.infer import segment_slides

CARD = {"mpp": 2.0, "class_names": CLASSES, "class_colors": [list(c) for c in COLORS]}


@pytest.fixture(autouse=True)
def _setup(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pbip_engine, "CUCIM_AVAILABLE", False)  # torch first: see test_segment_slide
    real = seg_engine.SegmentPredictor
    loads = []

    def predictor(model, *a, **kw):  # the stage passes the checkpoint path; count the loads
        loads.append(model)
        return real(ColorNet(), device="cpu")

    monkeypatch.setattr(seg_engine, "SegmentPredictor", predictor)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield loads
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    d = tmp_path_factory.mktemp("cohort")
    img, truth = _toy(1024, 1536)
    paths = [
        write_pyramid(d / f"{n}.tif", img, mpp=0.5, n_levels=3, tile=64, compression="zlib") for n in "abc"
    ]
    (d / "broken.tif").write_bytes(b"not a tiff at all")
    return [paths[0], d / "broken.tif", paths[1], paths[2]], truth


def _kw(batch_size: int = 2) -> dict:
    return dict(overlap=0.25, blend="gaussian", batch_size=batch_size, resources=None)


def test_by_slide_splits_batches_that_straddle_slides():
    b1 = {"slide_path": np.array(["a", "a", "b"], dtype=object), "x": np.array([0, 1, 2])}
    b2 = {"slide_path": np.array(["b", "c"], dtype=object), "x": np.array([3, 4])}
    runs = [(p, r["x"].tolist()) for p, r in _by_slide([b1, b2])]
    assert runs == [("a", [0, 1]), ("b", [2]), ("b", [3]), ("c", [4])]


def test_cohort_loads_the_model_once_and_a_bad_slide_fails_alone(cohort, tmp_path, _setup):
    slides, truth = cohort
    results = list(segment_slides(slides, Path("model.pt"), CARD, tmp_path, **_kw()))
    assert [p.name for p, _ in results] == ["broken.tif", "a.tif", "b.tif", "c.tif"]  # plan failures first
    status = {p.name: r for p, r in results}
    assert isinstance(status["broken.tif"], Exception) and "broken.tif" in str(status["broken.tif"])
    assert len(_setup) == 1  # one predictor for the cohort, not one per slide
    for name in "abc":
        assert status[f"{name}.tif"]["n_tiles"] >= 1
        got = tifffile.imread(tmp_path / f"{name}.mask.ome.tif", level=0)
        assert (got == truth[::4, ::4]).mean() > 0.97


def test_a_tile_read_failure_is_kept_to_its_slide(cohort, tmp_path, monkeypatch, _setup):
    slides, truth = cohort
    real_reader = seg_engine.TileReader

    class FlakyReader(real_reader):
        def __call__(self, batch):
            if any(str(p).endswith("b.tif") for p in batch["slide_path"]):
                raise OSError("simulated unreadable tile in b.tif")
            return super().__call__(batch)

    monkeypatch.setattr(seg_engine, "TileReader", FlakyReader)
    results = {
        p.name: r for p, r in segment_slides(slides[2:] + slides[:1], Path("m.pt"), CARD, tmp_path, **_kw())
    }
    assert isinstance(results["b.tif"], OSError) and "b.tif" in str(results["b.tif"])
    for name in ("a", "c"):
        assert isinstance(results[f"{name}.tif"], dict)
        got = tifffile.imread(tmp_path / f"{name}.mask.ome.tif", level=0)
        assert (got == truth[::4, ::4]).mean() > 0.97
    assert not (tmp_path / "b.mask.ome.tif").exists()


def test_whole_image_segments_every_pixel_without_tissue_detection(tmp_path, _setup):
    """Patch images (GlaS) are all tissue: no detection at planning or at stitching, no pixel forced to 0."""
    pale = np.full((512, 768, 3), 235, np.uint8)  # pale enough that tissue detection finds nothing
    path = write_pyramid(tmp_path / "pale.tif", pale, mpp=0.5, n_levels=2, tile=64, compression="zlib")
    ((_, fails),) = segment_slides([path], Path("m.pt"), CARD, tmp_path / "a", **_kw())
    assert isinstance(fails, Exception) and "tissue" in str(fails)  # a slide: no tissue is an error
    ((_, stats),) = segment_slides([path], Path("m.pt"), CARD, tmp_path / "b", whole_image=True, **_kw())
    assert isinstance(stats, dict), stats
    got = tifffile.imread(tmp_path / "b" / "pale.mask.ome.tif", level=0)
    assert stats["n_tiles"] >= 1 and got.size > 0
    # Every pixel of a patch image is tissue: the model's favourite here is glass (0), yet no pixel is
    # called background (GlaS scores background as an error).
    assert got.min() >= 1


def test_a_truncated_jpeg_fails_alone_instead_of_being_segmented_grey(tmp_path, _setup):
    """OpenCV decodes a cut JPEG "successfully" (grey from the cut on); only libjpeg's warning tells."""
    import cv2

    from pbip_engine.engine.wsi.slides import SlideError

    img, _ = _toy(256, 256)
    data = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
    (tmp_path / "good.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    slides = [tmp_path / "cut.jpg", tmp_path / "good.jpg"]
    out = tmp_path / "out"
    results = {p.name: r for p, r in segment_slides(slides, Path("m.pt"), CARD, out, mpp_override=0.5,
                                                     whole_image=True, **_kw())}  # fmt: skip
    bad = results["cut.jpg"]
    assert isinstance(bad, SlideError) and bad.reason == "unreadable", bad
    assert str(bad).startswith(str(tmp_path / "cut.jpg")) and "Premature end of JPEG" in str(bad)
    assert isinstance(results["good.jpg"], dict) and (out / "good.mask.ome.tif").is_file()
    assert not list(out.glob("cut.*"))


def test_inference_context_equals_the_training_context(cohort, tmp_path, monkeypatch, _setup):
    """Slides are read at the crop stage 2 trained on (the card's tile_px), not at a fixed 512 px."""
    from pbip_engine.engine.inference.cohort import LEGACY_TILE_PX, inference_tile_px
    from pbip_engine.jobs.rundir import model_card
    from pbip_engine.schemas.spec import parse_spec

    spec = parse_spec(
        {"run": {"name": "t", "output": "o"}, "data": {"synthetic": {"slides": 1}}, "tiling": {"tile_px": 96},
         "classes": [{"name": "red", "color": [200, 0, 0]}]}, tmp_path)  # fmt: skip
    assert model_card(spec, "deeplabv2")["tile_px"] == 96 == inference_tile_px(model_card(spec, "deeplabv2"))
    assert inference_tile_px({"mpp": 1.0}) == LEGACY_TILE_PX  # a card written before tile_px
    assert (
        inference_tile_px(model_card(spec, "deeplabv2"), 128) == 128
    )  # segment.tile_px / --tile-px override
    seen: list[tuple[int, ...]] = []
    real_reader = seg_engine.TileReader

    class Recording(real_reader):
        def __call__(self, batch):
            out = super().__call__(batch)
            seen.append(tuple(out["image"].shape[1:3]))
            return out

    monkeypatch.setattr(seg_engine, "TileReader", Recording)
    card = {**CARD, "tile_px": 64}
    results = list(segment_slides(cohort[0][:1], Path("m.pt"), card, tmp_path, **_kw()))
    assert isinstance(results[0][1], dict) and seen and set(seen) == {(64, 64)}
    got = tifffile.imread(tmp_path / "a.mask.ome.tif", level=0)
    assert (got == cohort[1][::4, ::4]).mean() > 0.97  # small tiles stitch without seams


def test_slide_by_slide_retry_keeps_the_inference_tile(cohort, tmp_path, monkeypatch, _setup):
    """After the shared stream breaks, the per-slide retries still read at the card's tile_px."""
    slides, _ = cohort
    seen: set[tuple[int, ...]] = set()
    real_reader = seg_engine.TileReader

    class FlakyRecording(real_reader):
        def __call__(self, batch):
            if any(str(p).endswith("b.tif") for p in batch["slide_path"]):
                raise OSError("simulated unreadable tile in b.tif")
            out = super().__call__(batch)
            seen.add(tuple(out["image"].shape[1:3]))
            return out

    card = {**CARD, "tile_px": 64}
    ((_, alone),) = segment_slides(slides[3:], Path("m.pt"), card, tmp_path / "alone", **_kw())
    monkeypatch.setattr(seg_engine, "TileReader", FlakyRecording)
    results = {p.name: r for p, r in segment_slides(slides[2:], Path("m.pt"), card, tmp_path, **_kw())}
    assert isinstance(results["b.tif"], OSError) and isinstance(results["c.tif"], dict)
    assert seen == {(64, 64)}
    assert results["c.tif"]["n_tiles"] == alone["n_tiles"]  # planned at 64 px too, not at 512
