"""``tile`` stage: one Ray task per slide, each writing its own Parquet file and state record.

A slide that fails (unreadable, no mpp, no tissue, unknown annotation class) is reported and the
others go on. Finished slides are skipped on a re-run. Tasks are retried when a worker dies; since
each slide's output is written atomically, a retry cannot duplicate tiles.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pbip_engine.jobs.manifest import read_json, write_json_atomic
from pbip_engine.jobs.rundir import cohort_slides, slide_id_of
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage, unit_reason
from pbip_engine.schemas.spec import JobSpec, check_slide_ids

ANNOTATION_SUFFIXES = (".geojson", ".json", ".geojson.gz")


def annotation_dir(ctx: StageContext) -> Path | None:
    if ctx.spec.data.annotations:
        return Path(ctx.spec.data.annotations)
    if ctx.spec.data.synthetic is not None:
        return ctx.stage_dir("synth") / "annotations"
    return None


def find_annotation(folder: Path | None, slide_id: str) -> Path | None:
    if folder is None:
        return None
    for suf in ANNOTATION_SUFFIXES:
        p = folder / f"{slide_id}{suf}"
        if p.is_file():
            return p
    return None


def tile_params(spec: JobSpec) -> dict[str, Any]:
    from pbip_engine.engine.wsi.tiling import TileGridParams
    from pbip_engine.engine.wsi.tissue import TissueParams

    t = spec.tiling
    return {
        "grid": TileGridParams(mpp=t.mpp, tile_px=t.tile_px, overlap=t.overlap, min_tissue=t.min_tissue),
        "tissue": TissueParams(**t.tissue.model_dump()),
        "label_min_fraction": t.label_min_fraction,
        "jpeg_quality": t.jpeg_quality,
        "backends": tuple(t.backends),
        "class_names": spec.class_names,
        # A task holds cpus_per_worker CPUs: the reading thread plus this many encoders fill them.
        "encode_threads": max(0, int(spec.resources.cpus_per_worker) - 1),
        "max_pixels_per_byte": spec.resources.max_slide_pixels_per_byte,
    }


def _tile_one(path: str, slide_id: str, out_dir: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from pbip_engine.engine.ingest.tile_slide import tile_slide

    t0 = time.perf_counter()
    try:
        res = tile_slide(Path(path), slide_id, Path(out_dir), **kwargs)
        rec = asdict(res)
    except Exception as e:  # a bug, not a slide problem: still fail this slide alone
        rec = {"slide_id": slide_id, "status": "failed", "reason": f"{type(e).__name__}: {e}", "n_tiles": 0}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["path"] = path
    write_json_atomic(Path(out_dir) / "state" / f"{slide_id}.json", rec)
    return rec


@register_stage
class TileStage(Stage):
    name = "tile"
    deps = ("synth",)
    sections = ("data", "classes", "tiling")
    version = 2  # v2: GlaS patches follow the tiling grid (tile_px, mpp, overlap), size0 in native px

    def run(self, ctx: StageContext) -> StageResult:
        if ctx.spec.data.patches is not None:
            return self.run_patches(ctx)
        return self.run_slides(ctx)

    def run_patches(self, ctx: StageContext) -> StageResult:
        """A patch dataset (GlaS, BCSS-WSSS, ...) becomes the same tiles dataset as slides."""
        from tqdm.auto import tqdm

        from pbip_engine.engine.ingest.patch_tiles import open_patch_dataset, patch_grid, write_patch_tiles

        d, t = ctx.spec.data, ctx.spec.tiling
        assert d.patches is not None and d.patch_format is not None
        grid = (
            patch_grid(t.tile_px, t.mpp, d.patch_mpp or t.mpp, t.overlap) if d.patch_format == "glas" else {}
        )
        ds = open_patch_dataset(d.patch_format, d.patches, split="train", **grid)
        with tqdm(total=len(ds), desc="patches", unit="patch", disable=not ctx.progress) as bar:
            counts = write_patch_tiles(
                (ds[i] for i in range(len(ds))),
                ctx.work_dir,
                ctx.spec.tiling.mpp,
                ctx.spec.tiling.jpeg_quality,
                bar.update,
            )
        return StageResult(counts=counts)

    def run_slides(self, ctx: StageContext) -> StageResult:
        import ray
        from tqdm.auto import tqdm

        from pbip_engine.engine.annotations.tile_labels import read_slide_label_csv
        from pbip_engine.engine.wsi.slides import read_mpp_overrides

        spec = ctx.spec
        slides = cohort_slides(ctx)
        check_slide_ids(slides, "data.slides")
        ids = [slide_id_of(p) for p in slides]
        overrides = read_mpp_overrides(spec.data.mpp_overrides) if spec.data.mpp_overrides else {}
        slide_labels = (
            read_slide_label_csv(spec.data.labels_csv, spec.class_names) if spec.data.labels_csv else {}
        )
        ann_dir = annotation_dir(ctx)
        base = tile_params(spec)

        units: dict[str, dict[str, Any]] = {}
        todo = []
        for path, sid in zip(slides, ids, strict=True):
            state = read_json(ctx.work_dir / "state" / f"{sid}.json")
            if (
                state
                and state.get("status") == "done"
                and (ctx.work_dir / "tiles" / f"{sid}.parquet").exists()
            ):
                units[sid] = state
                continue
            kw = dict(base)
            kw["annotations"] = find_annotation(ann_dir, sid)
            kw["slide_labels"] = slide_labels.get(sid) or slide_labels.get(path.name)
            kw["mpp_override"] = overrides.get(sid) or overrides.get(path.name)
            todo.append((str(path), sid, kw))
        if units:
            ctx.log(f"[tile] {len(units)} slide(s) already done, {len(todo)} to go")

        if todo:
            # Largest file first (a proxy for tile count), so no worker starts a big slide near the end
            # while the others sit idle.
            todo.sort(key=lambda u: -_file_size(u[0]))
            ctx.ray(data=False)
            task = ray.remote(_tile_one).options(
                num_cpus=spec.resources.cpus_per_worker,
                max_retries=spec.resources.max_failures,
                retry_exceptions=False,
            )
            refs = {task.remote(p, sid, str(ctx.work_dir), kw): sid for p, sid, kw in todo}
            t0 = time.perf_counter()
            n_tiles = 0
            with tqdm(total=len(refs), desc="tile slides", unit="slide", disable=not ctx.progress) as bar:
                pending = list(refs)
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        sid = refs[ref]
                        try:
                            rec = ray.get(ref)
                        except Exception as e:  # worker died more often than max_failures
                            rec = {"slide_id": sid, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
                            write_json_atomic(ctx.work_dir / "state" / f"{sid}.json", rec)
                        units[sid] = rec
                        n_tiles += rec.get("n_tiles", 0) or 0
                        bar.set_postfix(tiles_per_s=f"{n_tiles / max(time.perf_counter() - t0, 1e-9):.0f}")
                        bar.update(1)
                        if rec["status"] == "failed":
                            ctx.log(f"[tile] {sid} FAILED: {unit_reason(rec)}")

        done = [u for u in units.values() if u["status"] == "done"]
        counts = {
            "slides": len(units),
            "slides_done": len(done),
            "slides_failed": len(units) - len(done),
            "tiles": sum(u.get("n_tiles", 0) for u in done),
            "labelled_tiles": sum(u.get("n_labelled", 0) for u in done),
        }
        return StageResult(counts=counts, units=units)


def _file_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:  # missing: it fails fast wherever it runs
        return 0
