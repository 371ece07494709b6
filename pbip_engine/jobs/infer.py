"""``segment`` stage and ``pbip-engine segment``: whole-slide inference on an autoscaling actor pool.

Per slide: tissue tiles at the model's µm/px with overlap -> ``TileReader`` actors -> ``SegmentPredictor``
actors (``concurrency=(min, max)``, GPUs per actor when asked) -> logits streamed back and blended into
a chunked on-disk canvas -> OME-TIFF label pyramid, QuPath GeoJSON and overlay, each written to a temp
name and renamed. Memory is bounded by the tiles in flight, never by the slide.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pbip_engine.engine.io.atomic import jsonable
from pbip_engine.engine.wsi.slides import MAX_PIXELS_PER_BYTE
from pbip_engine.jobs.manifest import read_json, write_json_atomic
from pbip_engine.jobs.resources import actor_pool_options
from pbip_engine.jobs.rundir import MODEL_CARD, cohort_slides, slide_id_of, synth_truth_dir
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.schemas.spec import ResourcesSection, check_slide_ids, expand_slides


def _result_stream(plans: list[Any], overrides: dict[str, float], *, model_path: Path, batch_size: int,
                   resources: ResourcesSection, tile_px: int, tta: bool | tuple[float, ...]) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Every plan's tiles through one Ray Data reader -> predictor actor pool, results in plan order.

    One pipeline for the cohort: the model is loaded once per actor, not once per slide, and the pool
    stays warm across slide boundaries.
    """
    import numpy as np
    import ray

    from pbip_engine.engine.inference.segment_slide import SegmentPredictor, TileReader

    tables = [p.tile_table() for p in plans]
    cols = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
    ds = ray.data.from_items([dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True)])
    ds.context.execution_options.preserve_order = True  # slides stream out one after the other
    ds = ds.map_batches(TileReader, fn_constructor_kwargs={"tile_px": tile_px, "mpp_overrides": overrides},
                        batch_size=batch_size, concurrency=(1, resources.autoscale.max), num_cpus=0.5)  # fmt: skip
    ds = ds.map_batches(
        SegmentPredictor,
        fn_constructor_kwargs={"model": str(model_path), "tta": tta},
        batch_size=batch_size,
        batch_format="numpy",
        **actor_pool_options(resources),
    )
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")


def segment_slides(
    slides: list[Path],
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
    whole_image: bool = False,
    tile_px: int | None = None,
    tta: bool | tuple[float, ...] = False,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE,
) -> Iterator[tuple[Path, dict[str, Any] | Exception]]:
    """The engine's cohort loop over a Ray Data actor pool when ``resources`` is given, else in process.

    ``tile_px`` None = the context the model was trained at (its card's ``tile_px``).
    """
    from pbip_engine.engine.inference.cohort import inference_tile_px, local_stream, segment_cohort

    px = inference_tile_px(card, tile_px)
    if resources is None:
        stream = local_stream(model_path, batch_size, px, tta)
    else:
        stream = functools.partial(
            _result_stream,
            model_path=model_path,
            batch_size=batch_size,
            resources=resources,
            tile_px=px,
            tta=tta,
        )
    return segment_cohort(
        slides,
        card,
        out_dir,
        stream,
        overlap=overlap,
        blend=blend,
        mpp_override=mpp_override,
        output_mpp=output_mpp,
        whole_image=whole_image,
        tile_px=px,
        max_pixels_per_byte=max_pixels_per_byte,
    )


def truth_dir(ctx: StageContext) -> Path | None:
    """Where the segment stage's truth masks are: ``segment.truth``, else the synthetic cohort's pyramids."""
    if ctx.spec.segment.truth:
        return Path(ctx.spec.segment.truth)
    if ctx.spec.data.synthetic is not None:
        return synth_truth_dir(ctx.output / "synth")
    return None


@register_stage
class SegmentStage(Stage):
    name = "segment"
    version = 2  # v2: slides are read at the model's training crop (segment.tile_px), not 512-px tiles
    deps = ("segmenter",)
    sections = ("classes", "segment", "tiling")

    def run(self, ctx: StageContext) -> StageResult:
        from tqdm.auto import tqdm

        from pbip_engine.engine.inference.cohort import CohortScorer
        from pbip_engine.engine.outputs.areas import write_areas_csv

        spec = ctx.spec
        seg_dir = ctx.stage_dir("segmenter")
        card = read_model_card(seg_dir / MODEL_CARD)
        check_model_loads(seg_dir / "best.pt")  # a broken model fails the stage once, not every slide
        slides = (
            expand_slides(spec.segment.slides, "segment.slides")
            if spec.segment.slides
            else cohort_slides(ctx)
        )
        check_slide_ids(slides, "segment.slides" if spec.segment.slides else "data.slides")
        ctx.ray()
        units: dict[str, dict[str, Any]] = {}
        scorer = CohortScorer(truth_dir(ctx), len(spec.classes), spec.segment.truth_lut)
        out = ctx.work_dir / "masks"
        todo = []
        for slide in slides:
            state = read_json(ctx.work_dir / "state" / f"{slide_id_of(slide)}.json")
            if state and state.get("status") == "done":  # a re-run skips what is written
                units[slide_id_of(slide)] = state
            else:
                todo.append(slide)

        for sid, rec in units.items():  # resumed slides: a bad truth fails the slide, not the stage
            units[sid] = scorer.score_record(sid, out / f"{sid}.mask.ome.tif", rec)
            if units[sid]["status"] == "failed":
                ctx.log(f"[segment] {sid} FAILED: {units[sid]['reason']}")
        with tqdm(total=len(slides), initial=len(units), desc="segment slides", unit="slide",
                  disable=not ctx.progress) as bar:  # fmt: skip
            results = segment_slides(todo, seg_dir / "best.pt", card, out, overlap=spec.segment.overlap,
                                     blend=spec.segment.blend, batch_size=spec.segment.batch_size,
                                     resources=spec.resources, output_mpp=spec.segment.output_mpp,
                                     mpp_override=spec.segment.input_mpp,
                                     whole_image=spec.segment.whole_image,
                                     tile_px=spec.segment.tile_px, tta=spec.segment.tta_option,
                                     max_pixels_per_byte=spec.resources.max_slide_pixels_per_byte)  # fmt: skip
            for slide, result in results:
                sid = slide_id_of(slide)
                if isinstance(result, Exception):  # one slide fails alone
                    rec = {"status": "failed", "reason": f"{type(result).__name__}: {result}"}
                else:
                    rec = {"status": "done", **jsonable(result)}
                    rec = scorer.score_record(sid, out / f"{sid}.mask.ome.tif", rec)
                if rec["status"] == "failed":
                    ctx.log(f"[segment] {sid} FAILED: {rec['reason']}")
                write_json_atomic(ctx.work_dir / "state" / f"{sid}.json", rec)
                units[sid] = rec
                bar.update(1)
        done = {k: v for k, v in units.items() if v["status"] == "done"}
        write_areas_csv(ctx.work_dir / "cohort_areas.csv", done, spec.class_names)
        extra: dict[str, Any] = {}
        scores = scorer.summary()
        if scores is not None:
            write_json_atomic(ctx.work_dir / "metrics.json", scores)
            extra["metrics"] = {k: scores.get(k) for k in ("miou", "fwiou", "mdice", "mbiou")}
            ctx.log(f"[segment] masks vs truth ({scores['n_images']} images): {extra['metrics']}")
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


class ModelError(ValueError):
    """``--model`` names no usable trained model: a command-level error, not a per-slide failure."""


def read_model_card(card_path: Path) -> dict[str, Any]:
    """The segmenter's card, or a ModelError naming the file (a truncated or hand-edited card)."""
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{card_path}: unreadable model card ({type(e).__name__}: {e})") from None
    missing = [
        k for k in ("mpp", "class_names", "class_colors") if not isinstance(card, dict) or k not in card
    ]
    if missing:
        raise ModelError(f"{card_path}: model card lacks {missing}; re-run the segmenter stage")
    return card


def check_model_loads(weights: Path) -> None:
    """Load the segmenter once here, so a broken checkpoint is one error, not one failure per slide."""
    from pbip_engine.engine.training.segmentation import load_segmenter

    try:
        load_segmenter(weights, "cpu")
    except Exception as e:
        raise ModelError(f"{weights}: cannot load the segmenter: {e}") from None


def segment_cli(model_dir: Path, inputs: list[Path], out: Path, mpp: float | None, address: str | None,
                overlap: float, batch_size: int, tile_px: int | None = None,
                tta: bool | tuple[float, ...] = False, key: str = "--slides") -> dict[str, Any]:  # fmt: skip
    """``pbip-engine segment``: a finished run's segmenter on new slides or plain images.

    Raises ModelError (unusable ``--model``) or SpecError (two inputs with one slide id) before any
    slide is read; per-slide problems are results.
    """
    check_slide_ids(inputs, key)
    card_path = model_dir / "segmenter" / MODEL_CARD
    seg = model_dir / "segmenter" / "best.pt"
    if not seg.is_file() or not card_path.is_file():
        raise ModelError(f"{model_dir}: no trained segmenter ({seg}, {card_path}); run the pipeline first")
    card = read_model_card(card_path)
    check_model_loads(seg)
    res = None
    if address:
        from pbip_engine.jobs.ray_runtime import ensure_ray

        res = ResourcesSection()
        ensure_ray(address, res)
    out.mkdir(parents=True, exist_ok=True)
    from pbip_engine.engine.inference.segment_slide import IMAGE_EXTENSIONS
    from pbip_engine.engine.inference.write import output_paths

    # A re-run into the same folder with the same model and settings resumes: slides done then from the
    # same input file (path, size, mtime; their mask still there) are kept, the rest (new, changed,
    # failed, interrupted) are segmented.
    st = seg.stat()
    settings = {"model": str(seg.resolve()), "model_bytes": st.st_size, "model_mtime_ns": st.st_mtime_ns,
                "mpp": mpp, "overlap": overlap, "tile_px": tile_px, "tta": tta}  # fmt: skip
    settings_key = hashlib.sha256(json.dumps(jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]

    def made_of(p: Path) -> str:  # the model, the settings and this input file as it is now
        try:
            s = p.stat()
            ident = [str(p.resolve()), s.st_size, s.st_mtime_ns]
        except OSError:
            return ""
        return hashlib.sha256(json.dumps([settings_key, ident]).encode()).hexdigest()[:16]

    before = read_json(out / "segment.json") or {}
    results: dict[str, Any] = {}
    todo = []
    for p in inputs:
        rec = before.get(slide_id_of(p))
        done = isinstance(rec, dict) and rec.get("status") == "done" and rec.get("made_of") == made_of(p)
        if done and output_paths(out, slide_id_of(p))["mask"].is_file():
            results[slide_id_of(p)] = {**rec, "resumed": True}
        else:
            todo.append(p)
    images = [p for p in todo if p.suffix.lower() in IMAGE_EXTENSIONS]
    wsis = [p for p in todo if p not in images]
    for group, whole in ((wsis, False), (images, True)):  # plain images are all tissue (patches)
        if not group:
            continue
        for p, r in segment_slides(group, seg, card, out, overlap=overlap, blend="gaussian",
                                   batch_size=batch_size, resources=res, mpp_override=mpp,
                                   whole_image=whole, tile_px=tile_px, tta=tta):  # fmt: skip
            if isinstance(r, Exception):
                results[slide_id_of(p)] = {"status": "failed", "reason": f"{type(r).__name__}: {r}"}
            else:
                results[slide_id_of(p)] = {"status": "done", "made_of": made_of(p), **jsonable(r)}
            write_json_atomic(out / "segment.json", {**before, **results})  # progress survives a kill
    write_json_atomic(out / "segment.json", {**before, **results})
    return results
