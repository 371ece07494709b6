"""``segment`` stage and ``pbip-engine segment``: whole-slide inference on an autoscaling actor pool.

Per slide: tissue tiles at the model's µm/px with overlap -> ``TileReader`` tasks -> ``SegmentPredictor``
actors (``concurrency=(min, max)``, GPUs per actor when asked) -> logits streamed back and blended into
a chunked on-disk canvas -> OME-TIFF label pyramid, QuPath GeoJSON and overlay, each written to a temp
name and renamed. Memory is bounded by the tiles in flight, never by the slide.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pbip_engine.engine.io.atomic import atomic_path, jsonable
from pbip_engine.jobs.manifest import read_json, write_json_atomic
from pbip_engine.jobs.resources import actor_pool_options
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.jobs.tile import cohort_slides, slide_id_of
from pbip_engine.schemas.spec import JobSpec, ResourcesSection, expand_slides

SEG_TILE_PX = 512
MODEL_CARD = "model.json"


def _by_slide(batches: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Split result batches (in plan order) into runs of one slide: batches may straddle two slides."""
    import numpy as np

    for b in batches:
        paths = np.asarray(b["slide_path"]).astype(str)
        cuts = [0, *(np.nonzero(paths[1:] != paths[:-1])[0] + 1).tolist(), len(paths)]
        for i, j in itertools.pairwise(cuts):
            yield paths[i], {k: v[i:j] for k, v in b.items()}


def _result_stream(plans: list[Any], model_path: Path, batch_size: int, resources: ResourcesSection | None,
                   overrides: dict[str, float]) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Every plan's tiles through one reader -> predictor pipeline, results in plan order.

    One pipeline for the cohort: the model is loaded once per actor, not once per slide, and the pool
    stays warm across slide boundaries.
    """
    import numpy as np

    from pbip_engine.engine.inference.segment_slide import SegmentPredictor, TileReader

    tables = [p.tile_table() for p in plans]
    if resources is None:
        reader, predictor = TileReader(SEG_TILE_PX, overrides), SegmentPredictor(str(model_path))
        for t in tables:
            for i in range(0, len(t["x"]), batch_size):
                yield predictor(reader({k: v[i : i + batch_size] for k, v in t.items()}))
        return
    import ray

    cols = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
    ds = ray.data.from_items([dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True)])
    ds.context.execution_options.preserve_order = True  # slides stream out one after the other
    ds = ds.map_batches(TileReader, fn_constructor_kwargs={"tile_px": SEG_TILE_PX, "mpp_overrides": overrides},
                        batch_size=batch_size, concurrency=(1, resources.autoscale.max), num_cpus=0.5)  # fmt: skip
    ds = ds.map_batches(
        SegmentPredictor,
        fn_constructor_kwargs={"model": str(model_path)},
        batch_size=batch_size,
        batch_format="numpy",
        **actor_pool_options(resources),
    )
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")


class _PipelineBroken(RuntimeError):
    """The shared reader/predictor pipeline failed (not one slide's stitching)."""


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
) -> Iterator[tuple[Path, dict[str, Any] | Exception]]:
    """Segment a cohort; yields ``(slide, stats)`` or ``(slide, exception)`` as each slide is written.

    With ``resources`` the tiles of all slides flow through one Ray Data reader -> predictor actor pool,
    else through this process. A slide that cannot be planned or stitched fails alone; if the shared
    pipeline itself breaks (an unreadable tile), the slides not yet written are retried one by one so
    the failure stays with its slide.
    """
    from pbip_engine.engine.inference.segment_slide import plan, stitch_and_write

    plans, t0 = [], time.perf_counter()
    for slide in slides:
        try:
            p = plan(
                slide,
                card["mpp"],
                SEG_TILE_PX,
                overlap,
                mpp_override=mpp_override,
                use_tissue=not whole_image,
            )
            plans.append((slide, p))
        except Exception as e:
            yield slide, e
    if not plans:
        return
    overrides = {str(s): mpp_override for s, _ in plans} if mpp_override else {}
    pending = list(plans)
    try:
        pieces = _by_slide(
            _result_stream([p for _, p in plans], model_path, batch_size, resources, overrides)
        )
        head: list[tuple[str, dict[str, Any]]] = []

        def this_slide(path: str) -> Iterator[dict[str, Any]]:
            while True:
                try:
                    item = head.pop() if head else next(pieces, None)
                except Exception as e:
                    raise _PipelineBroken(e) from e
                if item is None:
                    return
                if item[0] != path:
                    head.append(item)  # the next slide's first run
                    return
                yield item[1]

        while pending:
            slide, p = pending[0]
            tiles = this_slide(p.slide_path)
            try:
                stats = stitch_and_write(slide, tiles, out_dir, card["class_names"], card["class_colors"],
                                         output_mpp or card["mpp"], mpp_override=mpp_override, tissue=p.tissue,
                                         restrict_to_tissue=not whole_image, blend=blend)  # fmt: skip
                stats["seconds"] = round(time.perf_counter() - t0, 3)
                stats["tissue_mpix"] = float(p.tissue_mpix)
                result: dict[str, Any] | Exception = stats
            except _PipelineBroken:
                raise
            except Exception as e:
                result = e
            for _ in tiles:  # a failed slide's remaining tiles
                pass
            pending.pop(0)
            t0 = time.perf_counter()
            yield slide, result
    except Exception as e:  # the shared pipeline broke: go on slide by slide
        cause = e.__cause__ if isinstance(e, _PipelineBroken) and e.__cause__ else e
        if len(pending) == 1:
            yield pending[0][0], cause
            return
        for slide, _ in pending:
            yield from segment_slides([slide], model_path, card, out_dir, overlap=overlap, blend=blend,
                                      batch_size=batch_size, resources=resources, mpp_override=mpp_override,
                                      output_mpp=output_mpp, whole_image=whole_image)  # fmt: skip


def score_slide_mask(mask_path: Path, truth_path: Path, n_classes: int, truth_lut: list[int] | None = None):
    """A whole-slide mask against a truth mask (PNG or pyramid) of the same level-0 frame (nearest resampling)."""
    import cv2
    import numpy as np

    from pbip_engine.engine.metrics import MetricsError, SegmentationMeter, read_mask

    pred = read_mask(mask_path)
    truth = read_mask(truth_path)
    if truth_lut is not None:
        if truth.size and int(truth.max()) >= len(truth_lut):
            raise MetricsError(
                f"{truth_path}: value {int(truth.max())} outside segment.truth_lut {truth_lut}"
            )
        truth = np.asarray(truth_lut, dtype=np.uint8)[truth]
    if truth.shape != pred.shape:
        truth = cv2.resize(truth, (pred.shape[1], pred.shape[0]), interpolation=cv2.INTER_NEAREST)
    meter = SegmentationMeter(n_classes, ignore_background=True)
    meter.update(pred, truth, name=mask_path.name)
    return meter


def truth_files(ctx: StageContext) -> dict[str, Path]:
    """Slide id -> truth mask: ``segment.truth`` when given, else the synthetic cohort's truth pyramids."""
    from pbip_engine.engine.metrics import index_mask_dir

    spec = ctx.spec
    if spec.segment.truth:
        return index_mask_dir(Path(spec.segment.truth))
    if spec.data.synthetic is not None:
        return index_mask_dir(ctx.output / "synth" / "truth")
    return {}


def write_areas_csv(path: Path, rows: dict[str, dict[str, Any]], class_names: list[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
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
        truths = truth_files(ctx)
        total = SegmentationMeter(len(spec.classes), ignore_background=True)
        out = ctx.work_dir / "masks"
        todo = []
        for slide in slides:
            state = read_json(ctx.work_dir / "state" / f"{slide_id_of(slide)}.json")
            if state and state.get("status") == "done":  # a re-run skips what is written
                units[slide_id_of(slide)] = state
            else:
                todo.append(slide)

        def score(sid: str, rec: dict[str, Any]) -> None:
            if sid in truths and rec["status"] == "done":
                m = score_slide_mask(out / f"{sid}.mask.ome.tif", truths[sid], len(spec.classes),
                                     spec.segment.truth_lut)  # fmt: skip
                rec["metrics"] = {k: m.compute().get(k) for k in ("miou", "mdice", "mbiou")}
                total.merge(m)

        for sid, rec in units.items():
            score(sid, rec)
        with tqdm(total=len(slides), initial=len(units), desc="segment slides", unit="slide",
                  disable=not ctx.progress) as bar:  # fmt: skip
            results = segment_slides(todo, seg_dir / "best.pt", card, out, overlap=spec.segment.overlap,
                                     blend=spec.segment.blend, batch_size=spec.segment.batch_size,
                                     resources=spec.resources, output_mpp=spec.segment.output_mpp,
                                     mpp_override=spec.segment.input_mpp,
                                     whole_image=spec.segment.whole_image)  # fmt: skip
            for slide, result in results:
                sid = slide_id_of(slide)
                if isinstance(result, Exception):  # one slide fails alone
                    rec = {"status": "failed", "reason": f"{type(result).__name__}: {result}"}
                    ctx.log(f"[segment] {sid} FAILED: {rec['reason']}")
                else:
                    rec = {"status": "done", **jsonable(result)}
                    try:
                        score(sid, rec)
                    except Exception as e:
                        rec = {"status": "failed", "reason": f"scoring: {type(e).__name__}: {e}"}
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
            ctx.log(f"[segment] masks vs truth ({total.n_images} images): {extra['metrics']}")
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
    from pbip_engine.engine.inference.segment_slide import IMAGE_EXTENSIONS

    results = {}
    images = [p for p in inputs if p.suffix.lower() in IMAGE_EXTENSIONS]
    wsis = [p for p in inputs if p not in images]
    for group, whole in ((wsis, False), (images, True)):  # plain images are all tissue (patches)
        if not group:
            continue
        for p, r in segment_slides(group, seg, card, out, overlap=overlap, blend="gaussian",
                                   batch_size=batch_size, resources=res, mpp_override=mpp,
                                   whole_image=whole):  # fmt: skip
            if isinstance(r, Exception):
                results[p.stem] = {"status": "failed", "reason": f"{type(r).__name__}: {r}"}
            else:
                results[p.stem] = {"status": "done", **jsonable(r)}
    write_json_atomic(out / "segment.json", results)
    return results
