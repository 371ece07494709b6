"""Segmenting a cohort through one shared tile stream, and scoring it against truth masks.

One stream for all slides keeps the model loaded and the predictors busy across slide boundaries; the
stream is a parameter so that the same loop runs in this process or over a Ray Data actor pool (built
in ``jobs.infer``), and a broken stream is retried slide by slide so a failure stays with its slide.

The cohort figure is one confusion matrix over every scored pixel, not a mean of slide figures, so a
large slide weighs by its size; the truth may use another label convention (``truth_lut``) or be finer
than the written mask (it is resampled, nearest, to the mask's frame).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pbip_engine.engine.metrics import MetricsError, SegmentationMeter, fit_truth, index_mask_dir, read_mask
from pbip_engine.engine.wsi.slides import MAX_PIXELS_PER_BYTE

LEGACY_TILE_PX = 512  # inference tile of models whose card predates ``tile_px`` (their old behaviour)
SLIDE_METRICS = ("miou", "mdice", "mbiou")

# Tissue masks the cohort's plans keep for writing; past this many mask pixels a plan drops its mask and
# the writer detects tissue again (same parameters, same result), so planning N slides up front holds
# O(budget) memory, not O(N) - one large cohort never costs every slide its output through an OOM kill.
KEEP_TISSUE_PIXELS = 256 * 1024 * 1024

# (plans, per-slide mpp overrides) -> prediction batches in plan order (rows carry ``slide_path``)
ResultStream = Callable[[list[Any], dict[str, float]], Iterator[dict[str, Any]]]


def _by_slide(batches: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Split result batches (in plan order) into runs of one slide: batches may straddle two slides."""
    import numpy as np

    for b in batches:
        paths = np.asarray(b["slide_path"]).astype(str)
        cuts = [0, *(np.nonzero(paths[1:] != paths[:-1])[0] + 1).tolist(), len(paths)]
        for i, j in itertools.pairwise(cuts):
            yield paths[i], {k: v[i:j] for k, v in b.items()}


def inference_tile_px(card: dict[str, Any], override: int | None = None) -> int:
    """The tile edge (px at the model's µm/px) slides are planned and read at: the training context.

    A segmenter sees the same pixels differently in a 96-px crop and in a 512-px window (deep features
    of the same pixels had cosine similarity 0.34-0.46 between the two on the demo cohort), so inference
    uses the crop size stage 2 was trained on unless the caller overrides it.
    """
    if override is not None:
        return int(override)
    return int(card.get("tile_px") or LEGACY_TILE_PX)


def local_stream(
    model_path: Path, batch_size: int, tile_px: int, tta: bool | tuple[float, ...] = False
) -> ResultStream:
    """The reader and predictor in this process, batch by batch (``pbip-engine segment`` without Ray)."""

    def stream(plans: list[Any], overrides: dict[str, float]) -> Iterator[dict[str, Any]]:
        from pbip_engine.engine.inference.segment_slide import SegmentPredictor, TileReader

        tables = [p.tile_table() for p in plans]
        reader, predictor = TileReader(tile_px, overrides), SegmentPredictor(str(model_path), tta=tta)
        for t in tables:
            for i in range(0, len(t["x"]), batch_size):
                yield predictor(reader({k: v[i : i + batch_size] for k, v in t.items()}))

    return stream


class _PipelineBroken(RuntimeError):
    """The shared reader/predictor pipeline failed (not one slide's stitching)."""


def segment_cohort(
    slides: list[Path],
    card: dict[str, Any],
    out_dir: Path,
    stream: ResultStream,
    *,
    overlap: float,
    blend: str,
    mpp_override: float | None = None,
    output_mpp: float | None = None,
    whole_image: bool = False,
    tile_px: int = LEGACY_TILE_PX,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE,
) -> Iterator[tuple[Path, dict[str, Any] | Exception]]:
    """Segment a cohort; yields ``(slide, stats)`` or ``(slide, exception)`` as each slide is written.

    The tiles of all slides flow through one ``stream`` (in this process, or a Ray Data actor pool that
    the caller builds), so the model is loaded once for the cohort. A slide that cannot be planned or
    stitched fails alone; if the shared stream itself breaks (an unreadable tile), the slides not yet
    written are retried one by one so the failure stays with its slide.
    """
    import numpy as np

    from pbip_engine.engine.inference.segment_slide import plan, stitch_and_write

    plans, t0, kept = [], time.perf_counter(), 0
    for slide in slides:
        try:
            p = plan(
                slide,
                card["mpp"],
                tile_px,
                overlap,
                mpp_override=mpp_override,
                use_tissue=not whole_image,
                max_pixels_per_byte=max_pixels_per_byte,
            )
            if p.tissue is not None:
                kept += p.tissue.mask.size
                p.tissue = (
                    dataclasses.replace(
                        p.tissue, thumbnail=np.zeros((0, 0, 3), np.uint8)
                    )  # unused by the writer
                    if kept <= KEEP_TISSUE_PIXELS
                    else None
                )
            plans.append((slide, p))
        except Exception as e:
            yield slide, e
    if not plans:
        return
    overrides = {str(s): mpp_override for s, _ in plans} if mpp_override else {}
    pending = list(plans)
    try:
        pieces = _by_slide(stream([p for _, p in plans], overrides))
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
                                         restrict_to_tissue=not whole_image, all_tissue=whole_image, blend=blend)  # fmt: skip
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
            yield from segment_cohort([slide], card, out_dir, stream, overlap=overlap, blend=blend,
                                      mpp_override=mpp_override, output_mpp=output_mpp,
                                      whole_image=whole_image, tile_px=tile_px,
                                      max_pixels_per_byte=max_pixels_per_byte)  # fmt: skip


def score_slide_mask(
    mask_path: Path, truth_path: Path, n_classes: int, truth_lut: list[int] | None = None
) -> SegmentationMeter:
    """A whole-slide mask against a truth mask (PNG or pyramid) of the same level-0 frame (nearest resampling).

    The truth may be at another scale (the slide's full resolution: masks are written at the model's
    µm/px) but not of another aspect ratio: that is a MetricsError naming both files, not a score.
    """
    import numpy as np

    pred = read_mask(mask_path)
    truth = read_mask(truth_path)
    if truth_lut is not None:
        if truth.size and int(truth.max()) >= len(truth_lut):
            raise MetricsError(
                f"{truth_path}: value {int(truth.max())} outside segment.truth_lut {truth_lut}"
            )
        truth = np.asarray(truth_lut, dtype=np.uint8)[truth]
    truth = fit_truth(truth, pred.shape, truth_path, mask_path)
    meter = SegmentationMeter(n_classes, ignore_background=True)
    meter.update(pred, truth, name=mask_path.name)
    return meter


class CohortScorer:
    """Slide masks vs the truth folder's masks (matched by slide id); slides without truth are not scored."""

    def __init__(self, truth_dir: Path | None, n_classes: int, truth_lut: list[int] | None = None) -> None:
        self.truths = index_mask_dir(truth_dir) if truth_dir is not None else {}
        self.n_classes = n_classes
        self.truth_lut = truth_lut
        self.total = SegmentationMeter(n_classes, ignore_background=True)

    def score(self, slide_id: str, mask_path: Path) -> dict[str, Any] | None:
        """The slide's figures (added to the cohort's), or None where it has no truth."""
        if slide_id not in self.truths:
            return None
        m = score_slide_mask(mask_path, self.truths[slide_id], self.n_classes, self.truth_lut)
        self.total.merge(m)
        return {k: m.compute().get(k) for k in SLIDE_METRICS}

    def score_record(self, slide_id: str, mask_path: Path, rec: dict[str, Any]) -> dict[str, Any]:
        """``rec`` (a slide's state) with its figures added, or turned into a failure with the scoring
        error: a bad truth fails its slide alone, never the stage, also when a re-run scores a slide
        it resumed as done."""
        if rec.get("status") != "done":
            return rec
        try:
            metrics = self.score(slide_id, mask_path)
        except Exception as e:
            return {"status": "failed", "reason": f"scoring: {type(e).__name__}: {e}"}
        return rec if metrics is None else {**rec, "metrics": metrics}

    def summary(self) -> dict[str, Any] | None:
        """The cohort's figures over every scored slide, or None where none was scored."""
        return self.total.compute() if self.total.n_images else None
