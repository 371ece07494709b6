"""The pipeline end to end on a real local Ray: synth -> tile -> embed -> bank -> classnet -> pseudo."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pbip_engine.jobs.driver import run_pipeline
from pbip_engine.schemas.datasets import TILES
from pbip_engine.schemas.spec import load_spec

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STAGES = ["synth", "tile", "embed", "bank", "classnet", "pseudo", "segmenter", "segment"]
CLASSES = [
    {"name": "tumour", "color": [200, 40, 40]},
    {"name": "stroma", "color": [240, 130, 190]},
    {"name": "lymphocytes", "color": [60, 60, 200]},
    {"name": "necrosis", "color": [150, 120, 40]},
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    tmp = tmp_path_factory.mktemp("pipe")
    raw = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 3, "size": 3072, "seed": 2}},
        "classes": CLASSES,
        "tiling": {"mpp": 1.0, "tile_px": 64, "min_tissue": 0.5},
        "encoder": {"batch_size": 32},
        "bank": {"k": 2, "n_k": 5, "holdout_fraction": 0.2},
        "stage1": {"epochs": 1, "batch_size": 8, "lr": 1.0e-4},
        # crops of the stitched regions (issue 15): 96 px of context, not the 64-px tiles
        "segmenter": {"epochs": 1, "batch_size": 16, "crop_px": 96, "crops_per_epoch": 1},
        "segment": {"batch_size": 8},
        "resources": {"workers": 1, "autoscale": {"min": 1, "max": 2}},
    }
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    spec = load_spec(p)
    summary = run_pipeline(spec, only=STAGES, log=print, progress=False)
    assert summary.exit_code == 0, summary.stages
    return Path(spec.run.output)


def test_tiles_written_per_slide_with_schema(pipeline_run: Path) -> None:
    files = sorted((pipeline_run / "tile" / "tiles").glob("*.parquet"))
    assert [f.stem for f in files] == ["synth_000", "synth_001", "synth_002"]
    table = pq.read_table(files[0])
    assert table.schema.remove_metadata().equals(TILES.remove_metadata())
    assert table.num_rows > 10
    labelled = table.filter(table["labelled"])
    assert labelled.num_rows > 0
    assert all(len(v) == 4 for v in labelled["labels"].to_pylist())
    assert (pipeline_run / "tile" / "qc" / "synth_000.tissue.png").is_file()
    m = json.loads((pipeline_run / "tile" / "manifest.json").read_text())
    assert m["units"]["synth_000"]["status"] == "done" and m["units"]["synth_000"]["backend"]


def test_embeddings_match_tiles(pipeline_run: Path) -> None:
    import pyarrow.dataset as pads

    n_tiles = sum(
        pq.ParquetFile(f).metadata.num_rows for f in (pipeline_run / "tile" / "tiles").glob("*.parquet")
    )
    m = json.loads((pipeline_run / "embed" / "manifest.json").read_text())
    emb = pads.dataset(str(pipeline_run / "embed" / "embeddings" / m["embeddings_key"])).to_table()
    assert emb.num_rows == n_tiles
    ids = emb["tile_id"].to_pylist()
    assert len(set(ids)) == len(ids)  # no duplicates
    assert emb.schema.field("embedding").type.list_size == 1280


def test_bank_gallery_and_zero_shot(pipeline_run: Path) -> None:
    bank = json.loads((pipeline_run / "bank" / "bank.json").read_text())
    assert bank["class_names"] == [c["name"] for c in CLASSES]
    assert (pipeline_run / "bank" / "gallery.png").stat().st_size > 1000
    report = json.loads((pipeline_run / "bank" / "report.json").read_text())
    assert 0.0 <= report["zero_shot"]["macro_f1"] <= 1.0


def test_classnet_checkpoint_and_metrics(pipeline_run: Path) -> None:
    d = pipeline_run / "classnet"
    assert (d / "best.pt").is_file() and (d / "last.pt").is_file()
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["loss"] > 0 and rows[0]["total"] > 0
    assert "val_score" in rows[0]  # stage1.val_fraction held tiles out to pick best.pt


def test_pseudo_masks_index_and_score(pipeline_run: Path) -> None:
    import numpy as np
    from PIL import Image

    d = pipeline_run / "pseudo"
    index = pq.read_table(d / "index.parquet").to_pylist()
    assert len(index) > 50
    row = index[0]
    mask = np.asarray(Image.open(d / row["mask_path"]))
    assert mask.shape == (64, 64) and mask.max() <= 4
    present = {k + 1 for k, v in enumerate(row["labels"]) if v}
    assert set(np.unique(mask)) - {0} <= present  # masks only use the tile's image-level classes
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["ignore_background"] is True and 0.3 < metrics["miou"] <= 1.0
    assert (d / "heatmaps" / "synth_000.png").is_file()
    regions = pq.read_table(d / "regions" / "synth_000.parquet").to_pylist()
    assert regions and all(r["slide_id"] == "synth_000" and r["width0"] > 0 for r in regions)
    # px at tiling.mpp (what stage 2 sizes its crops by): 1 µm/px tiles of a 0.5 µm/px level 0, half its extent
    assert all(r["width"] > 0 and abs(2 * r["width"] - r["width0"]) <= 2 for r in regions)


def test_stage_2_trained_on_region_crops_and_segments_at_that_context(pipeline_run: Path) -> None:
    seg = json.loads((pipeline_run / "manifests" / "segmenter.json").read_text())
    assert seg["regions"]["crop_px"] == 96 and seg["regions"]["train_regions"] > 0
    card = json.loads((pipeline_run / "segmenter" / "model.json").read_text())
    assert card["tile_px"] == 96  # segment reads the slides at the crop stage 2 trained on


def test_segment_outputs_read_back(pipeline_run: Path) -> None:
    import shapely.geometry
    import tifffile

    d = pipeline_run / "segment" / "masks"
    with tifffile.TiffFile(d / "synth_000.mask.ome.tif") as tf:
        assert tf.is_ome and len(tf.series[0].levels) >= 2
        level0 = tf.series[0].levels[0].asarray()
        assert level0.dtype.name == "uint8" and level0.max() <= 4
        assert "tumour" in tf.ome_metadata and 'PhysicalSizeX="1.0"' in tf.ome_metadata.replace(
            "1.0000", "1.0"
        )
    gj = json.loads((d / "synth_000.classes.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in gj["features"]}
    assert names and names <= {c["name"] for c in CLASSES}
    for f in gj["features"]:
        assert shapely.geometry.shape(f["geometry"]).is_valid
        assert len(f["properties"]["classification"]["color"]) == 3
    assert (d / "synth_000.overlay.png").is_file()
    areas = (pipeline_run / "segment" / "cohort_areas.csv").read_text().splitlines()
    assert areas[0].startswith("slide,tissue_mpix,tumour_um2") and len(areas) == 4
    metrics = json.loads((pipeline_run / "segment" / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["ignore_background"] is True


def test_report_of_the_run_in_a_browser(pipeline_run: Path) -> None:
    """The HTML report of this real run, opened in headless Chromium: every stage, every image loads."""
    from browser import open_page

    from pbip_engine.jobs.report import build_report

    page = open_page(build_report(pipeline_run))
    assert page.stage_rows == dict.fromkeys(STAGES, "done")
    # 3 slides x (QC + overlay) + gallery + 2 training curves + 3 pseudo mosaics
    assert len(page.images) == 12 and all(i["naturalWidth"] > 0 for i in page.images), page.images
    assert page.console_errors == [] and page.failed_requests == [] and page.non_file_requests == []
    for text in ("synth_000", "tumour", "Whole-slide masks vs truth", "Pseudo masks vs truth"):
        assert text in page.text


def test_rerun_skips_everything(pipeline_run: Path) -> None:
    spec = load_spec(pipeline_run.parent / "spec.yaml")
    logs: list[str] = []
    s = run_pipeline(spec, only=STAGES, log=logs.append, progress=False)
    assert all(v.get("skipped") for v in s.stages.values()), s.stages


def test_pseudo_reads_tiles_alone_or_in_their_slide(pipeline_run: Path, tmp_path: Path) -> None:
    """pbip's default reads each slide's tiles as one picture (``RegionPseudo``, one slide Parquet per call);
    ``cam_context: tiles`` takes the per-tile actors and the shuffle by slide. Both label the same tiles, and
    the context changes some masks."""
    import shutil

    import numpy as np
    from PIL import Image

    assert load_spec(pipeline_run.parent / "spec.yaml").pseudo.cam_context == "regions"
    out = tmp_path / "out"
    shutil.copytree(pipeline_run, out, ignore=shutil.ignore_patterns("pseudo", "seg*", ".work"))
    raw = yaml.safe_load((pipeline_run.parent / "spec.yaml").read_text())
    raw["run"]["output"] = str(out)
    raw["pseudo"] = {"cam_context": "tiles"}
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    s = run_pipeline(load_spec(p), only=["pseudo"], log=print, progress=False)
    assert s.exit_code == 0, s.stages
    regions = pq.read_table(pipeline_run / "pseudo" / "index.parquet").to_pylist()
    tiles = pq.read_table(out / "pseudo" / "index.parquet").to_pylist()
    assert [r["tile_id"] for r in regions] == [r["tile_id"] for r in tiles]
    differ = sum(
        not np.array_equal(np.asarray(Image.open(pipeline_run / "pseudo" / a["mask_path"])),
                           np.asarray(Image.open(out / "pseudo" / b["mask_path"])))
        for a, b in zip(regions, tiles, strict=True)
    )  # fmt: skip
    assert 0 < differ < len(tiles)  # single-label tiles agree; some multi-label ones do not
    assert (out / "pseudo" / "regions" / "synth_000.parquet").is_file()


def test_tile_cams_grouped_by_block_give_the_whole_slides_masks(pipeline_run: Path, tmp_path: Path) -> None:
    """``cam_context: tiles`` with ``block_px: 256`` on a real Ray: the per-tile actors tag each tile with the
    blocks that read it and Ray Data groups by block, not by slide; every tile's mask equals the one the
    whole-slide grouping gives (each tile's CAM is its own, so the ring of context tiles makes them exact)."""
    import shutil

    import numpy as np
    from PIL import Image

    masks, names = {}, {}
    for block_px in (4096, 256):
        out = tmp_path / str(block_px)
        shutil.copytree(pipeline_run, out, ignore=shutil.ignore_patterns("pseudo", "seg*", ".work"))
        raw = yaml.safe_load((pipeline_run.parent / "spec.yaml").read_text())
        raw["run"]["output"] = str(out)
        raw["pseudo"] = {"cam_context": "tiles", "image_prototypes": 0, "block_px": block_px}
        p = tmp_path / f"spec{block_px}.yaml"
        p.write_text(yaml.safe_dump(raw))
        s = run_pipeline(load_spec(p), only=["pseudo"], log=print, progress=False)
        assert s.exit_code == 0, s.stages
        index = pq.read_table(out / "pseudo" / "index.parquet").to_pylist()
        masks[block_px] = {
            r["tile_id"]: np.asarray(Image.open(out / "pseudo" / r["mask_path"])) for r in index
        }
        names[block_px] = sorted(f.name for f in (out / "pseudo" / "regions").glob("*.parquet"))
    assert names[4096] == ["synth_000.parquet", "synth_001.parquet", "synth_002.parquet"]
    assert len(names[256]) > 3 and all(".b" in n for n in names[256])  # every slide here spans > 256 px
    assert masks[256].keys() == masks[4096].keys()
    for tid, mask in masks[4096].items():
        np.testing.assert_array_equal(masks[256][tid], mask, err_msg=tid)


def test_rerun_after_failed_pseudo_counts_each_tile_once(pipeline_run: Path) -> None:
    """A failed attempt's work folder (same inputs) is kept for resume; its samples must not be appended to."""
    import shutil

    import pyarrow.dataset as pads

    final = pipeline_run / "pseudo"
    n = pq.read_table(final / "index.parquet").num_rows
    work = pipeline_run / ".work" / "pseudo"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(final, work)  # what the failed attempt left: samples/ and masks/ already written
    manifest = json.loads((final / "manifest.json").read_text())
    manifest["status"] = "failed"
    (final / "manifest.json").write_text(json.dumps(manifest))
    s = run_pipeline(load_spec(pipeline_run.parent / "spec.yaml"), only=["pseudo"], log=print, progress=False)
    assert s.exit_code == 0 and not s.stages["pseudo"].get("skipped"), s.stages
    assert pq.read_table(final / "index.parquet").num_rows == n
    assert pads.dataset(str(final / "samples"), format="parquet").count_rows() == n
    assert json.loads((final / "metrics.json").read_text())["n_images"] == n


def test_balanced_class_weights_and_the_stage1_backbone(pipeline_run: Path, tmp_path: Path) -> None:
    """segmenter.class_weights: balanced on a real Ray: counted from the stitched regions, recorded, trained; in
    the same run segmenter.backbone_init: stage1, whose Train worker reads the ClassNet's checkpoint."""
    import shutil

    from pbip_engine.engine.training.losses import balanced_weights

    out = tmp_path / "out"
    shutil.copytree(pipeline_run, out, ignore=shutil.ignore_patterns("segmenter", "segment", ".work"))
    raw = yaml.safe_load((pipeline_run.parent / "spec.yaml").read_text())
    raw["run"]["output"] = str(out)
    raw["segmenter"]["class_weights"] = "balanced"
    raw["segmenter"]["backbone_init"] = "stage1"
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    s = run_pipeline(load_spec(p), only=["segmenter"], log=print, progress=False)
    assert s.exit_code == 0, s.stages
    m = json.loads((out / "segmenter" / "manifest.json").read_text())
    assert len(m["class_pixels"]) == len(CLASSES) + 1 and sum(m["class_pixels"]) > 0
    assert m["class_weights"] == pytest.approx(balanced_weights(m["class_pixels"]))
    assert len(set(m["class_weights"])) > 1  # the synthetic cohort's classes are not balanced
    assert m["backbone_init"] == "stage1" and "classnet" in m["inputs"]["upstream"], m["inputs"]["upstream"]


def test_embedding_only_the_bank_tiles(pipeline_run: Path, tmp_path: Path) -> None:
    """encoder.tiles: bank on a real Ray: only labelled single-label tiles reach the encoder, in their own folder."""
    import shutil

    import pyarrow.dataset as pads

    out = tmp_path / "out"
    shutil.copytree(
        pipeline_run, out, ignore=shutil.ignore_patterns("embed", "bank", "classnet", "pseudo", "seg*")
    )
    raw = yaml.safe_load((pipeline_run.parent / "spec.yaml").read_text())
    raw["run"]["output"] = str(out)
    raw["encoder"]["tiles"] = "bank"
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    s = run_pipeline(load_spec(p), only=["embed", "bank"], log=print, progress=False)
    assert s.exit_code == 0, s.stages
    tiles = pads.dataset(str(out / "tile" / "tiles"), format="parquet").to_table(
        columns=["tile_id", "labelled", "labels"]
    )
    want = {
        t
        for t, lab, ls in zip(*(tiles[c].to_pylist() for c in ("tile_id", "labelled", "labels")), strict=True)
        if lab and sum(ls) == 1
    }
    assert 0 < len(want) < tiles.num_rows
    m = json.loads((out / "embed" / "manifest.json").read_text())
    before = json.loads((pipeline_run / "embed" / "manifest.json").read_text())
    assert m["embeddings_key"] == before["embeddings_key"] + "__bank" and m["tiles_selected"] == "bank"
    emb = pads.dataset(str(out / "embed" / "embeddings" / m["embeddings_key"])).to_table(columns=["tile_id"])
    assert sorted(emb["tile_id"].to_pylist()) == sorted(want)
    assert json.loads((out / "bank" / "bank.json").read_text())["class_names"] == [c["name"] for c in CLASSES]
    report = json.loads((out / "bank" / "report.json").read_text())
    assert report["embedded_tiles"] == "bank" and all(
        c["multi_label"] is None for c in report["classes"].values()
    )


@pytest.mark.timeout(600)
def test_mpamatch_segmenter_trains_with_every_cpu_on_the_train_worker(ray_local, tmp_path: Path) -> None:
    """examples/glas-semi.yaml on 2 cores hung at its first epoch: the Train worker held both CPUs and the
    own-labels dataset's drop_columns asked Ray Data for a whole one. Same shape here: 2 CPUs, 2 per worker."""
    raw = {
        "run": {"name": "semi", "output": str(tmp_path / "out"), "seed": 0},
        "data": {"synthetic": {"slides": 2, "size": 1536, "seed": 2}},
        "classes": CLASSES,
        "tiling": {"mpp": 1.0, "tile_px": 64, "min_tissue": 0.5},
        "method": {"name": "mpamatch", "labelled_fraction": 0.5},
        "segmenter": {"epochs": 1, "batch_size": 8},
        "resources": {"workers": 1, "cpus_per_worker": 2},
    }
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    s = run_pipeline(load_spec(p), only=["synth", "tile", "segmenter"], log=print, progress=False)
    assert s.exit_code == 0, s.stages
    manifest = json.loads((tmp_path / "out" / "segmenter" / "manifest.json").read_text())
    split = manifest["labelled_split"]
    assert manifest["status"] == "done", manifest
    assert split["labelled_tiles"] > 0 and split["unlabelled_tiles"] > 0, split
