"""Synthetic H&E cohort: determinism, readable pyramids, annotations that agree with the truth."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import shapely
import tifffile
import tiffslide
from PIL import Image

import pbip_engine
from pbip_engine.engine.annotations.geojson import read_annotations
from pbip_engine.engine.outputs.tiff_writer import read_label_classes
from pbip_engine.engine.synth import (
    BCSS_PALETTE,
    SYNTH_CLASSES,
    SynthSlide,
    _required,
    write_cohort,
    write_patch_set,
)

NAMES = [n for n, _ in SYNTH_CLASSES]
SIZE = 768


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    seen: list[int] = []
    meta = write_cohort(out, n_slides=2, size=SIZE, seed=7, mpp=0.5, progress=seen.append)
    assert seen == [1, 2]
    return out, meta


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes_constant():
    assert NAMES == ["tumour", "stroma", "lymphocytes", "necrosis"]
    assert SYNTH_CLASSES[0][1] == (200, 40, 40) and SYNTH_CLASSES[3][1] == (150, 120, 40)


def test_required_classes_cover_every_class():
    for n in (1, 2, 3, 4, 7):
        covered = set().union(*(_required(i, n) for i in range(n)))
        assert covered == {1, 2, 3, 4}


def test_layout_and_cohort_json(cohort):
    out, meta = cohort
    assert json.loads((out / "cohort.json").read_text()) == meta
    assert meta["mpp"] == 0.5 and meta["size"] == SIZE and meta["seed"] == 7
    assert [c["name"] for c in meta["classes"]] == NAMES
    assert [s["id"] for s in meta["slides"]] == ["synth_000", "synth_001"]
    for s in meta["slides"]:
        for key in ("slide", "mask", "thumb", "annotations"):
            assert (out / s[key]).is_file(), s[key]
    assert not [p for p in out.rglob(".*")]  # no temporaries left behind


def test_determinism(cohort, tmp_path):
    out, _ = cohort
    again = tmp_path / "again"
    write_cohort(again, n_slides=2, size=SIZE, seed=7, mpp=0.5)
    assert all_files(again) == all_files(out)
    other = tmp_path / "other"
    write_cohort(other, n_slides=1, size=SIZE, seed=8, mpp=0.5)
    assert (other / "slides/synth_000.tif").read_bytes() != (out / "slides/synth_000.tif").read_bytes()
    assert (other / "truth/synth_000.mask.tif").read_bytes() != (
        out / "truth/synth_000.mask.tif"
    ).read_bytes()


def test_pyramids_and_mpp(cohort):
    out, meta = cohort
    s0 = meta["slides"][0]
    for key in ("slide", "mask"):
        sl = tiffslide.TiffSlide(out / s0[key])
        try:
            assert sl.level_count == 2
            assert sl.level_dimensions == ((SIZE, SIZE), (SIZE // 2, SIZE // 2))
            assert sl.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
        finally:
            sl.close()
    with tifffile.TiffFile(out / s0["slide"]) as tf:
        p = tf.pages[0]
        assert p.is_tiled and p.tilewidth == 256 and p.compression == tifffile.COMPRESSION.JPEG
        assert "DateTime" not in p.tags
    with tifffile.TiffFile(out / s0["mask"]) as tf:
        assert tf.pages[0].dtype == np.uint8 and tf.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    assert read_label_classes(out / s0["mask"]) == [(n, c) for n, c in SYNTH_CLASSES]
    if pbip_engine.CUCIM_AVAILABLE:
        from cucim import CuImage

        c = CuImage(str(out / s0["slide"]))
        assert c.resolutions["level_count"] == 2
        assert c.spacing()[:2] == pytest.approx([0.5, 0.5])


def test_truth_labels_csv_and_thumbnail(cohort):
    out, meta = cohort
    rows = list(csv.reader((out / "labels.csv").open()))
    assert rows[0] == ["slide", *NAMES]
    for row, s in zip(rows[1:], meta["slides"], strict=True):
        mask = tifffile.imread(out / s["mask"], key=0)
        present = [int((mask == k).any()) for k in range(1, 5)]
        assert row == [s["id"], *map(str, present)] and s["labels"] == present
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 4}
        assert 0.15 < (mask > 0).mean() < 0.9  # tissue with glass around it
        thumb = Image.open(out / s["thumb"])
        assert thumb.mode == "P" and max(thumb.size) <= 512
        assert set(np.unique(np.asarray(thumb))) <= {0, 1, 2, 3, 4}
    assert any(sum(s["labels"]) < 4 for s in meta["slides"])  # slide labels carry information


def test_rgb_matches_truth_and_classes_differ(cohort):
    out, meta = cohort
    s = meta["slides"][0]
    rgb = tifffile.imread(out / s["slide"], key=0).astype(np.float32)
    mask = tifffile.imread(out / s["mask"], key=0)
    bg = rgb[mask == 0].mean(0)
    assert (bg > 215).all()  # glass is near-white
    fg_means = {k: rgb[mask == k].mean(0) for k in range(1, 5) if (mask == k).sum() > 500}
    assert all(v.mean() < 215 for v in fg_means.values())  # tissue is stained


def test_annotations_valid_cover_all_classes_and_agree_with_truth(cohort):
    out, meta = cohort
    seen = set()
    for s in meta["slides"]:
        anns = read_annotations(out / s["annotations"])
        assert anns, s["id"]
        raw = json.loads((out / s["annotations"]).read_text())
        assert all(f["properties"]["classification"]["name"] in NAMES for f in raw["features"])
        mask = tifffile.imread(out / s["mask"], key=0)
        yy, xx = np.mgrid[0:SIZE:2, 0:SIZE:2] + 0.5
        dense = shapely.union_all([shapely.Point(x, y).buffer(r) for x, y, r in s["dense_areas"]])
        for a in anns:
            assert a.name in NAMES and a.color == dict(SYNTH_CLASSES)[a.name]
            assert a.geometry.is_valid and a.geometry.area > 0
            inside = shapely.contains_xy(a.geometry, xx.ravel(), yy.ravel()).reshape(xx.shape)
            truth = mask[::2, ::2][inside]
            assert truth.size > 0
            k = NAMES.index(a.name) + 1
            # eroded outlines sit well inside their class; dense-area outlines follow the boundary to
            # within the low-res step
            agree = 0.9 if a.geometry.within(dense) else 0.95
            assert (truth == k).mean() >= agree, (s["id"], a.name, (truth == k).mean())
            seen.add(a.name)
        # rough outlines (outside the dense areas) cover well under the class area (subset, eroded)
        for k, name in enumerate(NAMES, 1):
            area = sum(a.geometry.area for a in anns if a.name == name and not a.geometry.within(dense))
            assert area < 0.9 * max((mask == k).sum(), 1)
    assert seen == set(NAMES)


def test_dense_areas_give_correct_multi_label_tiles():
    """Tiles inside the dense areas carry every class they hold: the CAMs have something to localise."""
    from pbip_engine.engine.annotations.tile_labels import TileLabeler
    from pbip_engine.engine.synth import _annotations

    size, t = 2048, 128
    n_multi = n_dense = 0
    for i in range(2):
        sl = SynthSlide(seed=2, index=i, size=size, required=_required(i, 2))
        anns, areas = _annotations(sl, np.random.default_rng([2, i, 0xA77]))
        assert 3 <= len(areas) <= 4
        labeler = TileLabeler(
            len(NAMES),
            polygons=[a.geometry for a in anns],
            classes=np.array([NAMES.index(a.name) for a in anns]),
            min_fraction=0.1,
            source=f"slide {i}",
        )
        for x, y, r in areas:
            r_in = r / 1.25 / 2**0.5  # a square inside the ellipse's inscribed circle
            for ty in range(int(y - r_in), int(y + r_in) - t + 1, t):
                for tx in range(int(x - r_in), int(x + r_in) - t + 1, t):
                    truth = sl.labels(tx, ty, t, t)
                    if (truth > 0).mean() < 0.5:
                        continue
                    ok, lab = labeler.label(tx, ty, t)
                    assert ok, (i, tx, ty)
                    frac = np.array([(truth == k).mean() for k in range(1, len(NAMES) + 1)])
                    assert not ((lab == 1) & (frac < 0.02)).any(), (i, tx, ty, lab, frac)  # no wrong class
                    assert not ((lab == 0) & (frac > 0.2)).any(), (i, tx, ty, lab, frac)  # none missing
                    n_dense += 1
                    n_multi += int(lab.sum() > 1)
    assert n_dense >= 20 and n_multi >= 0.2 * n_dense, (n_dense, n_multi)


def test_tiles_are_seamless_and_independent():
    sl = SynthSlide(seed=3, index=1, size=1024, required=(1, 2, 3, 4))
    rgb, lab = sl.render(256, 256, 512, 512)
    tiles = np.zeros_like(rgb)
    for y in (256, 512):
        for x in (256, 512):
            t_rgb, t_lab = sl.render(x, y, 256, 256)
            np.testing.assert_array_equal(t_lab, lab[y - 256 : y, x - 256 : x])
            np.testing.assert_array_equal(sl.labels(x, y, 256, 256), t_lab)
            tiles[y - 256 : y, x - 256 : x] = t_rgb
    # only the faint per-region grain differs between one big render and four tiles
    diff = np.abs(tiles.astype(int) - rgb.astype(int))
    assert diff.mean() < 2.5
    # rendering is deterministic per region
    np.testing.assert_array_equal(sl.render(512, 256, 256, 256)[0], tiles[0:256, 256:512])


def test_stain_jitter_between_slides():
    means = []
    for i in range(3):
        sl = SynthSlide(seed=0, index=i, size=512, classes=(2,))
        rgb, lab = sl.render(0, 0, 512, 512)
        means.append(rgb[lab == 2].mean(0))
    assert max(np.abs(means[0] - m).max() for m in means[1:]) > 3


PATCH_RE = re.compile(r"^(?P<name>.+)\[(?P<lab>[01]{4})\]\.png$")


def test_patch_set_layout_and_labels(tmp_path):
    res = write_patch_set(tmp_path, n_train=6, n_val=3, n_test=3, seed=1, patch=224, slide_size=896)
    train = sorted(p.name for p in (tmp_path / "training").iterdir())
    assert len(train) == 6 and len(res["train"]) == 6
    for item in res["train"]:
        m = PATCH_RE.match(item["file"].split("/", 1)[1])
        assert m, item["file"]
        labels = [int(c) for c in m["lab"]]
        assert labels == item["labels"] and sum(labels) >= 1
        im = Image.open(tmp_path / item["file"])
        assert im.mode == "RGB" and im.size == (224, 224)
    for split in ("val", "test"):
        imgs = sorted(p.name for p in (tmp_path / split / "img").iterdir())
        masks = sorted(p.name for p in (tmp_path / split / "mask").iterdir())
        assert imgs == masks and len(imgs) == 3
        for item in res[split]:
            mask = Image.open(tmp_path / item["mask"])
            assert mask.mode == "P" and mask.size == (224, 224)
            assert mask.getpalette()[:15] == [v for c in BCSS_PALETTE for v in c]
            arr = np.asarray(mask)
            assert set(np.unique(arr)) <= {0, 1, 2, 3, 4}
            assert item["labels"] == [int((arr == k).any()) for k in range(4)]
            assert sum(item["labels"]) >= 1 and (arr != 4).mean() >= 0.5
    # disjoint source slides between splits
    prefixes = {
        split: {it["file"].split("/")[-1].split("_")[0] for it in res[split]}
        for split in ("train", "val", "test")
    }
    assert prefixes["train"].isdisjoint(prefixes["val"]) and prefixes["val"].isdisjoint(prefixes["test"])
    luad = write_patch_set(
        tmp_path / "luad", n_train=2, n_val=0, n_test=0, seed=1, label_style="luad", slide_size=896
    )
    assert all(re.search(r"-\[[01] [01] [01] [01]\]\.png$", it["file"]) for it in luad["train"])


@pytest.mark.slow
def test_bounded_memory_16k(tmp_path):
    """16384^2 RGB and label pyramids stream in bounded memory (model set up at full slide size).

    Tiles come from the real 16384^2 synthetic model but are reused across the slide to keep the
    test fast; rendering every tile (measured: ~30 s CPU) costs time, not memory.
    """
    code = textwrap.dedent(
        f"""
        import resource, numpy as np, pbip_engine
        from pbip_engine.engine.synth import SynthSlide, _single_thread_blas
        from pbip_engine.engine.outputs.tiff_writer import write_pyramid
        S = 16384
        with _single_thread_blas():
            sl = SynthSlide(seed=0, index=0, size=S, required=(1, 2, 3, 4))
            sl.lowres()
            rgb, lab = sl.render(S // 2, S // 2, 256, 256)
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            write_pyramid(r"{tmp_path}/mask.tif", lambda x, y, w, h: lab[:h, :w], (S, S), 0.5, kind="labels")
            write_pyramid(r"{tmp_path}/rgb.tif", lambda x, y, w, h: rgb[:h, :w], (S, S), 0.5, kind="rgb")
            print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    growth_mb = float(r.stdout.strip().splitlines()[-1])
    assert growth_mb < 500, growth_mb
    with tifffile.TiffFile(tmp_path / "rgb.tif") as tf:
        assert tf.pages[0].shape == (16384, 16384, 3) and len(tf.pages) == 6
    with tifffile.TiffFile(tmp_path / "mask.tif") as tf:
        assert tf.pages[0].shape == (16384, 16384) and len(tf.pages) == 6
