"""``segment`` stage and ``pbip-engine segment``: whole-slide inference on an autoscaling actor pool.

Per slide: tissue tiles at the model's µm/px with overlap -> ``TileReader`` tasks -> ``SegmentPredictor``
actors (``concurrency=(min, max)``, GPUs per actor when asked) -> logits streamed back and blended into
a chunked on-disk canvas -> OME-TIFF label pyramid, QuPath GeoJSON and overlay, each written to a temp
name and renamed. Memory is bounded by the tiles in flight, never by the slide.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from pbip_engine.engine.atomic import jsonable
from pbip_engine.jobs.manifest import read_json, write_json_atomic
from pbip_engine.jobs.resources import actor_pool_options
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.jobs.tile import cohort_slides, slide_id_of
from pbip_engine.schemas.spec import JobSpec, ResourcesSection, expand_slides

SEG_TILE_PX = 512
MODEL_CARD = "model.json"


def segment_one(
    slide: Path,
    model_path: Path,
    card: dict[str, Any],
    out_dir: Path,
    *,
    overlap: float,
    blend: str,
    batch_size: int,
    resources: ResourcesSection | None,
    mpp_override: float | None = None,
    output_mpp: float | None = None,
) -> dict[str, Any]:
    """One slide; with ``resources`` the tiles flow through Ray Data actors, else through this process."""
    from pbip_engine.engine.segment_slide import SegmentPredictor, TileReader, plan, stitch_and_write

    t0 = time.perf_counter()
    p = plan(slide, card["mpp"], SEG_TILE_PX, overlap, mpp_override=mpp_override)
    overrides = {str(slide): mpp_override} if mpp_override else None
    if resources is None:
        reader, predictor = TileReader(SEG_TILE_PX, overrides), SegmentPredictor(str(model_path))
        table = p.tile_table()
        n = len(table["x"])

        def results():
            for i in range(0, n, batch_size):
                yield predictor(reader({k: v[i : i + batch_size] for k, v in table.items()}))

        stream = results()
    else:
        import ray

        ds = ray.data.from_items(
            [
                dict(zip(p.tile_table(), row, strict=True))
                for row in zip(*p.tile_table().values(), strict=True)
            ]
        )
        ds = ds.map_batches(TileReader, fn_constructor_kwargs={"tile_px": SEG_TILE_PX, "mpp_overrides": overrides},
                            batch_size=batch_size, concurrency=(1, resources.autoscale.max), num_cpus=0.5)  # fmt: skip
        ds = ds.map_batches(
            SegmentPredictor,
            fn_constructor_kwargs={"model": str(model_path)},
            batch_size=batch_size,
            batch_format="numpy",
            **actor_pool_options(resources),
        )
        stream = ds.iter_batches(batch_size=batch_size, batch_format="numpy")
    stats = stitch_and_write(
        slide,
        stream,
        out_dir,
        card["class_names"],
        card["class_colors"],
        output_mpp or card["mpp"],
        mpp_override=mpp_override,
        tissue=p.tissue,
        blend=blend,
    )
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["tissue_mpix"] = float(p.tissue_mpix)
    return stats


def score_slide_mask(mask_path: Path, truth_path: Path, n_classes: int):
    """A whole-slide mask against a truth pyramid of the same level-0 frame (nearest resampling)."""
    import cv2
    import tifffile

    from pbip_engine.engine.metrics import SegmentationMeter

    pred = tifffile.imread(str(mask_path), level=0)
    truth = tifffile.imread(str(truth_path), level=0)
    if truth.shape != pred.shape:
        truth = cv2.resize(truth, (pred.shape[1], pred.shape[0]), interpolation=cv2.INTER_NEAREST)
    meter = SegmentationMeter(n_classes, ignore_background=True)
    meter.update(pred, truth, name=mask_path.name)
    return meter


def write_areas_csv(path: Path, rows: dict[str, dict[str, Any]], class_names: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "tissue_mpix", *[f"{c}_um2" for c in class_names]])
        for sid, st in sorted(rows.items()):
            areas = st.get("class_areas_um2", {})
            w.writerow(
                [
                    sid,
                    round(st.get("tissue_mpix", 0.0), 3),
                    *[round(areas.get(c, 0.0), 1) for c in class_names],
                ]
            )
    tmp.replace(path)


@register_stage
class SegmentStage(Stage):
    name = "segment"
    deps = ("segmenter",)
    sections = ("classes", "segment", "tiling")

    def run(self, ctx: StageContext) -> StageResult:
        from tqdm.auto import tqdm

        from pbip_engine.engine.metrics import SegmentationMeter

        spec = ctx.spec
        seg_dir = ctx.stage_dir("segmenter")
        card = json.loads((seg_dir / MODEL_CARD).read_text())
        slides = (
            expand_slides(spec.segment.slides, "segment.slides")
            if spec.segment.slides
            else cohort_slides(ctx)
        )
        ctx.ray()
        units: dict[str, dict[str, Any]] = {}
        truth_dir = ctx.output / "synth" / "truth" if spec.data.synthetic is not None else None
        total = SegmentationMeter(len(spec.classes), ignore_background=True)
        out = ctx.work_dir / "masks"
        with tqdm(total=len(slides), desc="segment slides", unit="slide", disable=not ctx.progress) as bar:
            for slide in slides:
                sid = slide_id_of(slide)
                state = read_json(ctx.work_dir / "state" / f"{sid}.json")
                if state and state.get("status") == "done":
                    units[sid] = state
                    bar.update(1)
                    continue
                try:
                    st = segment_one(slide, seg_dir / "best.pt", card, out, overlap=spec.segment.overlap,
                                     blend=spec.segment.blend, batch_size=spec.segment.batch_size,
                                     resources=spec.resources, output_mpp=spec.segment.output_mpp)  # fmt: skip
                    rec = {"status": "done", **jsonable(st)}
                except Exception as e:  # one slide fails alone
                    rec = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
                    ctx.log(f"[segment] {sid} FAILED: {rec['reason']}")
                if (
                    rec["status"] == "done"
                    and truth_dir is not None
                    and (truth_dir / f"{sid}.mask.tif").exists()
                ):
                    m = score_slide_mask(
                        out / f"{sid}.mask.ome.tif", truth_dir / f"{sid}.mask.tif", len(spec.classes)
                    )
                    rec["metrics"] = {k: m.compute().get(k) for k in ("miou", "mdice", "mbiou")}
                    total.merge(m)
                write_json_atomic(ctx.work_dir / "state" / f"{sid}.json", rec)
                units[sid] = rec
                bar.update(1)
        done = {k: v for k, v in units.items() if v["status"] == "done"}
        write_areas_csv(ctx.work_dir / "cohort_areas.csv", done, spec.class_names)
        extra: dict[str, Any] = {}
        if total.n_images:
            scores = total.compute()
            write_json_atomic(ctx.work_dir / "metrics.json", scores)
            extra["metrics"] = {k: scores.get(k) for k in ("miou", "fwiou", "mdice", "mbiou")}
            ctx.log(f"[segment] whole-slide masks vs truth (tissue pixels): {extra['metrics']}")
        mpix = sum(v.get("tissue_mpix", 0.0) for v in done.values())
        secs = sum(v.get("seconds", 0.0) for v in done.values())
        return StageResult(
            counts={
                "slides": len(units),
                "slides_done": len(done),
                "tissue_mpix": round(mpix, 2),
                "mpix_per_s": round(mpix / secs, 3) if secs else None,
            },
            units=units,
            extra=extra,
        )


def model_card(spec: JobSpec) -> dict[str, Any]:
    """What ``pbip-engine segment`` needs to use a trained model without the spec."""
    return {
        "mpp": spec.tiling.mpp,
        "class_names": spec.class_names,
        "class_colors": [list(c) for c in spec.class_colors],
        "arch": spec.segmenter.arch,
        "backbone": spec.segmenter.backbone,
    }


def segment_cli(model_dir: Path, inputs: list[Path], out: Path, mpp: float | None, address: str | None,
                overlap: float, batch_size: int) -> dict[str, Any]:  # fmt: skip
    """``pbip-engine segment``: a finished run's segmenter on new slides or plain images."""
    card_path = model_dir / "segmenter" / MODEL_CARD
    seg = model_dir / "segmenter" / "best.pt"
    if not seg.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"{model_dir}: no trained segmenter ({seg}, {card_path}); run the pipeline first"
        )
    card = json.loads(card_path.read_text())
    res = None
    if address:
        from pbip_engine.jobs.ray_runtime import ensure_ray

        res = ResourcesSection()
        ensure_ray(address, res)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for p in inputs:
        try:
            results[p.stem] = {"status": "done", **jsonable(segment_one(
                p, seg, card, out, overlap=overlap, blend="gaussian", batch_size=batch_size,
                resources=res, mpp_override=mpp))}  # fmt: skip
        except Exception as e:
            results[p.stem] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    write_json_atomic(out / "segment.json", results)
    return results
