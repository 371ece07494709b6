"""One slide end to end: outputs and schema, labels, and every bad input as a clean failed result."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import tifffile
from wsi_synth import he_like, write_pyramid

import pbip_engine  # noqa: F401  (before anything that imports torch)
from pbip_engine.engine.annotations.geojson import Annotation, read_annotations, write_annotations
from pbip_engine.engine.ingest.tile_slide import output_paths, tile_slide, white_fraction
from pbip_engine.engine.wsi.tiling import TileGridParams
from pbip_engine.engine.wsi.tissue import TissueParams
from pbip_engine.schemas.datasets import TILES, tile_key

CLASSES = ["Tumor", "Stroma"]
GRID = TileGridParams(mpp=0.5, tile_px=224, min_tissue=0.5)
REAL = [
    ("CMU-1-Small-Region.svs", None),
    ("tcga-cr-7395-01a-01-ts1.svs", 0.25),  # JPEG 2000, no mpp stored
    ("CMU-1-Small-Region.pyramid.tif", None),
]


def run(path: Path, out: Path, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("class_names", CLASSES)
    kw.setdefault("grid", GRID)
    kw.setdefault("tissue", TissueParams())
    return tile_slide(path, kw.pop("slide_id", "s1"), out, **kw)


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def assert_failed(res, reason: str, path: Path, out: Path) -> None:  # type: ignore[no-untyped-def]
    assert res.status == "failed" and res.reason == reason, res
    assert res.message and res.message.startswith(str(path))
    assert res.n_tiles == 0
    assert files_under(out) == []  # nothing partial, no temp files


@pytest.mark.parametrize(("name", "override"), REAL)
def test_real_slides_tile(wsi_dir: Path, tmp_path: Path, name: str, override: float | None) -> None:
    sid = Path(name).stem
    calls: list[int] = []
    res = run(wsi_dir / name, tmp_path, slide_id=sid, mpp_override=override, progress=calls.append)
    assert res.status == "done", res
    assert res.n_tiles > 20 and res.n_labelled == 0 and res.tiles_per_s > 0
    assert sum(calls) == res.n_tiles
    paths = output_paths(tmp_path, sid)
    assert files_under(tmp_path) == sorted(str(p.relative_to(tmp_path)) for p in paths.values())
    table = pq.read_table(paths["tiles"])
    assert table.schema.equals(TILES, check_metadata=True)
    assert table.num_rows == res.n_tiles
    rows = table.slice(0, 5).to_pylist()
    for r in rows:
        assert r["tile_id"] == tile_key(sid, r["x"], r["y"])
        assert r["labels"] == [0, 0] and r["labelled"] is False
        assert r["mpp"] == pytest.approx(0.5, rel=0.01)
        img = cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (224, 224, 3)
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        assert r["white_fraction"] == pytest.approx(white_fraction(rgb), abs=0.05)
        assert r["tissue_fraction"] >= 0.5
    ids = table.column("tile_id").to_pylist()
    assert len(set(ids)) == len(ids)
    tissue = read_annotations(paths["qc_geojson"])
    assert [a.name for a in tissue] == ["Tissue"] and tissue[0].geometry.area > 0
    assert cv2.imread(str(paths["qc_png"])) is not None


def test_tissue_geojson_feeds_back_as_roi(wsi_dir: Path, tmp_path: Path) -> None:
    src = wsi_dir / "CMU-1-Small-Region.pyramid.tif"
    first = run(src, tmp_path / "a")
    assert first.status == "done"
    roi = output_paths(tmp_path / "a", "s1")["qc_geojson"]
    again = run(src, tmp_path / "b", roi=roi)
    assert again.status == "done"
    assert abs(again.n_tiles - first.n_tiles) <= 2  # same region up to rasterisation at the edges


def test_labelled_synthetic_slide(tmp_path: Path) -> None:
    img = he_like(1024, 1536, [(400, 512, 380), (1150, 512, 330)])
    slide = write_pyramid(tmp_path / "lab.tif", img, mpp=0.5, n_levels=3)
    ann = tmp_path / "lab.geojson"
    write_annotations(
        ann,
        [
            Annotation("tumor", (255, 0, 0), shapely.Point(400, 512).buffer(300)),
            Annotation("Stroma", (0, 255, 0), shapely.box(1000, 300, 1300, 700)),
        ],
    )
    grid = TileGridParams(mpp=1.0, tile_px=64, min_tissue=0.5)  # 128 level-0 px tiles, read at level 1
    res = run(slide, tmp_path / "out", annotations=ann, grid=grid, tissue=TissueParams(target_mpp=4.0))
    assert res.status == "done", res
    rows = pq.read_table(output_paths(tmp_path / "out", "s1")["tiles"]).drop(["image"]).to_pylist()
    assert res.n_labelled == sum(r["labelled"] for r in rows) > 0
    by_xy = {(r["x"], r["y"]): r for r in rows}
    assert all(r["level"] == 1 and r["size0"] == 128 for r in rows)
    inside_tumor = by_xy[(384, 512)]  # square fully inside the tumour disc
    assert inside_tumor["labelled"] and inside_tumor["labels"] == [1, 0]
    inside_stroma = by_xy[(1152, 512)]
    assert inside_stroma["labelled"] and inside_stroma["labels"] == [0, 1]
    outside = by_xy[(1152, 768)]  # tissue below the stroma box, no outline
    assert not outside["labelled"] and outside["labels"] == [0, 0]


@pytest.mark.parametrize("threads", [0, 2])
def test_encoding_inline_or_on_threads_writes_the_same_dataset(tmp_path: Path, threads: int) -> None:
    """A one-CPU worker encodes inline; a bigger one overlaps reads with encoder threads: same bytes."""
    img = he_like(1024, 1536, [(400, 512, 380), (1150, 512, 330)])
    slide = write_pyramid(tmp_path / "enc.tif", img, mpp=0.5, n_levels=3)
    grid = TileGridParams(mpp=0.5, tile_px=128, min_tissue=0.5)
    ref = run(slide, tmp_path / "ref", grid=grid, encode_threads=1)
    res = run(slide, tmp_path / "out", grid=grid, encode_threads=threads)
    assert res.status == ref.status == "done" and res.n_tiles == ref.n_tiles > 20
    a = pq.read_table(output_paths(tmp_path / "ref", "s1")["tiles"])
    b = pq.read_table(output_paths(tmp_path / "out", "s1")["tiles"])
    assert a.equals(b)
    with pytest.raises(ValueError, match="encode_threads"):
        run(slide, tmp_path / "bad", encode_threads=-1)


@pytest.mark.parametrize(("cpus", "threads"), [(0.5, 0), (1, 0), (2, 1), (4, 3)])
def test_tile_tasks_use_the_cpus_ray_gives_them(tmp_path: Path, cpus: float, threads: int) -> None:
    from pbip_engine.jobs.tile import tile_params
    from pbip_engine.schemas.spec import parse_spec

    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1}},
        "classes": [{"name": "a", "color": [1, 2, 3]}],
        "resources": {"cpus_per_worker": cpus},
    }
    assert tile_params(parse_spec(raw, tmp_path))["encode_threads"] == threads


def test_one_level_slide_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tissue pass and tiles share the only level: it is read whole once, and the tiles do not change."""
    import pbip_engine.engine.ingest.tile_slide as ts
    from pbip_engine.engine.wsi.slides import Slide

    img = he_like(1024, 1536, [(700, 500, 420)])
    slide = write_pyramid(tmp_path / "one.tif", img, mpp=0.5, n_levels=1, tile=128)
    reads: list[tuple[int, int]] = []
    orig = Slide.read_region

    def counting(self, location, level, size):  # type: ignore[no-untyped-def]
        if self._held is None:
            reads.append(tuple(size))
        return orig(self, location, level, size)

    monkeypatch.setattr(Slide, "read_region", counting)
    held = run(slide, tmp_path / "held")
    assert held.status == "done" and held.n_tiles > 5
    assert reads == [(1536, 1024)]  # one read of the whole level, nothing from the file after it
    reads.clear()
    monkeypatch.setattr(ts, "HOLD_MAX_PIXELS", 0)
    direct = run(slide, tmp_path / "direct")
    assert direct.n_tiles == held.n_tiles and len(reads) > 1
    a = pq.read_table(output_paths(tmp_path / "held", "s1")["tiles"])
    b = pq.read_table(output_paths(tmp_path / "direct", "s1")["tiles"])
    assert a.equals(b)


def test_slide_labels_apply_to_every_tile(wsi_dir: Path, tmp_path: Path) -> None:
    res = run(wsi_dir / "CMU-1-Small-Region.pyramid.tif", tmp_path, slide_labels=[0, 1])
    assert res.status == "done" and res.n_labelled == res.n_tiles
    labels = pq.read_table(output_paths(tmp_path, "s1")["tiles"], columns=["labels"]).column(0).to_pylist()
    assert all(v == [0, 1] for v in labels)


# --------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "absent.svs"
    assert_failed(run(p, tmp_path / "out"), "missing", p, tmp_path / "out")


def test_truncated_svs(wsi_dir: Path, tmp_path: Path) -> None:
    data = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: int(len(data) * 0.4)])
    assert_failed(run(p, tmp_path / "out"), "unreadable", p, tmp_path / "out")


def test_corrupt_tiles_fail_midway_without_leftovers(tmp_path: Path) -> None:
    """Levels 1-2 intact (tissue detection works), last level-0 tile row zeroed: tiling fails cleanly."""
    img = he_like(1024, 1024, [(512, 512, 500)])
    p = write_pyramid(tmp_path / "bad.tif", img, mpp=0.5, n_levels=3, tile=128)
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))[-8:]
    data = bytearray(p.read_bytes())
    for off, n in spans:
        data[off : off + n] = bytes(n)
    p.write_bytes(bytes(data))
    out = tmp_path / "out"
    grid = TileGridParams(mpp=0.5, tile_px=128, min_tissue=0.1)
    # tiffslide raises on the corrupt JPEG; cuCIM only logs it to stderr (see report).
    res = run(p, out, grid=grid, backends=("tiffslide",))
    assert_failed(res, "read_failed", p, out)
    # The message names the failed read, which covers the zeroed row (y 896-1023).
    m = re.search(r"region x=\d+ y=(\d+) level=0 size=\d+x(\d+)", res.message)
    assert m and int(m[1]) <= 896 and int(m[1]) + int(m[2]) >= 1024, res.message


def test_text_file_renamed_svs(tmp_path: Path) -> None:
    p = tmp_path / "notes.svs"
    p.write_text("just some text\n")
    assert_failed(run(p, tmp_path / "out"), "unreadable", p, tmp_path / "out")


def test_missing_mpp_then_override(wsi_dir: Path, tmp_path: Path) -> None:
    p = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
    res = run(p, tmp_path / "a")
    assert_failed(res, "no_mpp", p, tmp_path / "a")
    assert "slide,mpp" in res.message
    res = run(p, tmp_path / "b", mpp_override=0.25)
    assert res.status == "done" and res.mpp_source == "override" and res.n_tiles > 0


def test_unknown_annotation_class(wsi_dir: Path, tmp_path: Path) -> None:
    ann = tmp_path / "a.geojson"
    write_annotations(ann, [Annotation("Lymphocytes", (0, 0, 255), shapely.box(0, 0, 500, 500))])
    out = tmp_path / "out"
    res = run(wsi_dir / "CMU-1-Small-Region.svs", out, annotations=ann)
    assert res.status == "failed" and res.reason == "labels"
    assert res.message.startswith(str(ann)) and "Lymphocytes" in res.message and "Tumor" in res.message
    assert files_under(out) == []


def test_zero_tissue(tmp_path: Path) -> None:
    p = write_pyramid(tmp_path / "blank.tif", np.full((768, 768, 3), 243, np.uint8), mpp=0.5, n_levels=2)
    assert_failed(run(p, tmp_path / "out"), "no_tissue", p, tmp_path / "out")


def test_conflicting_label_sources_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        run(tmp_path / "x.svs", tmp_path, annotations=tmp_path / "a.geojson", slide_labels=[1, 0])
    with pytest.raises(ValueError, match="slide_id"):
        run(tmp_path / "x.svs", tmp_path, slide_id="../evil")
