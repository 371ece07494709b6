"""``pseudo`` stage: ClassNet CAMs -> per-tile pseudo masks (palettised PNG + Parquet index) on an actor pool.

Masks are restricted to each tile's image-level classes; background follows ``pseudo.background``.
Where ground truth exists (the synthetic cohort; patch datasets that ship masks, e.g. GlaS), the pseudo masks are scored against it, and a
per-slide mosaic of the masks is written for QA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.engine.training.batches import decode_batch
from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.resources import actor_pool_options, read_options, write_parquet_fresh
from pbip_engine.jobs.rundir import mask_relpath, synth_truth_dir, tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage

COLUMNS = ["tile_id", "slide_id", "x", "y", "size0", "image", "labels", "labelled"]


class PseudoPredictor:
    """Ray Data callable: one trained stage-1 model per actor; writes each tile's mask PNG, returns the index rows."""

    def __init__(self, spec: Any, model_path: str, bank_dir: str | None, out_dir: str) -> None:
        import torch

        from pbip_engine.methods import PseudoOptions, Stage1Inputs, get_method

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        method = get_method(spec.method.name)
        self.model = method.load_cam_model(
            spec.method, Path(model_path), Stage1Inputs.from_spec(spec, bank_dir), self.device
        )
        p = spec.pseudo
        self.options = PseudoOptions(p.background, p.white_threshold, p.min_object, p.gamma)
        self.out_dir = Path(out_dir)
        self.colors = [(255, 255, 255), *spec.class_colors]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pbip_engine.engine.pseudo.cams import write_palette_png

        masks = self.model.predict_masks(decode_batch(batch), self.options)
        paths, pngs = [], []
        for sid, x, y, m in zip(batch["slide_id"], batch["x"], batch["y"], masks, strict=True):
            rel = mask_relpath(str(sid), int(x), int(y))
            (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            write_palette_png(self.out_dir / rel, m, self.colors)
            paths.append(rel)
            pngs.append((self.out_dir / rel).read_bytes())
        return {
            "tile_id": batch["tile_id"],
            "slide_id": batch["slide_id"],
            "x": batch["x"],
            "y": batch["y"],
            "size0": batch["size0"],
            "mask_path": np.array(paths, dtype=object),
            "labels": batch["labels"],
            "image": batch["image"],  # the stage-2 training samples travel with their masks
            "mask": np.array(pngs, dtype=object),
        }


@register_stage
class PseudoStage(Stage):
    name = "pseudo"
    version = 4  # v2: samples/ Parquet (image + mask); v3: scored against patch masks; v4: method plug-ins
    deps = ("tile", "bank", "classnet")
    sections = ("classes", "method", "pseudo")

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow as pa
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq
        import ray

        from pbip_engine.engine.pseudo.mosaics import slide_mosaics
        from pbip_engine.engine.pseudo.scoring import patch_truth, score_pseudo, synth_truth
        from pbip_engine.schemas.datasets import PSEUDO_INDEX

        spec = ctx.spec
        ctx.ray()
        ds = ray.data.read_parquet(
            [str(f) for f in tile_files(ctx.stage_dir("tile"))], columns=COLUMNS, **read_options()
        )
        ds = ds.filter(lambda row: bool(row["labelled"]), **read_options())  # fuses into the read
        model_path = ctx.stage_dir("classnet") / "best.pt"
        ds = ds.map_batches(
            PseudoPredictor,
            fn_constructor_kwargs={
                "spec": spec,
                "model_path": str(model_path),
                "bank_dir": str(ctx.stage_dir("bank")) if "bank" in self.dependencies(spec) else None,
                "out_dir": str(ctx.work_dir),
            },
            batch_size=32,
            batch_format="numpy",
            **actor_pool_options(spec.resources),
        )
        write_parquet_fresh(ds, ctx.work_dir / "samples")  # masks/ PNGs are rewritten in place
        cols = ["tile_id", "slide_id", "x", "y", "size0", "mask_path", "labels"]
        index = (
            pads.dataset(str(ctx.work_dir / "samples"), format="parquet").to_table(columns=cols).to_pylist()
        )
        index.sort(key=lambda r: r["tile_id"])
        table = pa.Table.from_pylist(
            [{k: r[k] for k in PSEUDO_INDEX.names} for r in index], schema=PSEUDO_INDEX
        )
        pq.write_table(table, ctx.work_dir / "index.parquet")
        extra: dict[str, Any] = {}
        truth_for = None
        if spec.data.synthetic is not None:
            truth_for = synth_truth(synth_truth_dir(ctx.stage_dir("synth")))
        elif spec.data.patches:
            truth_for = patch_truth(spec.data.patch_format, spec.data.patches)
        scores = score_pseudo(index, ctx.work_dir, truth_for, len(spec.classes)) if truth_for else {}
        if scores:
            write_json_atomic(ctx.work_dir / "metrics.json", scores)
            extra["metrics"] = {k: scores.get(k) for k in ("miou", "fwiou", "mdice", "mbiou")}
            ctx.log(f"[pseudo] pseudo masks vs truth ({scores['n_images']} tiles): {extra['metrics']}")
            if "multi_label" in scores:
                m = scores["multi_label"]
                extra["metrics_multi_label"] = {k: m.get(k) for k in ("miou", "mdice", "mbiou", "n_images")}
                ctx.log(f"[pseudo] on multi-label tiles only: {extra['metrics_multi_label']}")
        if spec.pseudo.heatmaps:
            slide_mosaics(index, ctx.work_dir, spec.class_colors)
        return StageResult(counts={"masks": len(index)}, extra=extra)
