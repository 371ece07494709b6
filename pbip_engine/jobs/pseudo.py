"""``pseudo`` stage: ClassNet CAMs -> per-tile pseudo masks (palettised PNG + Parquet index) on an actor pool.

Masks are restricted to each tile's image-level classes; background follows ``pseudo.background``.
Where ground truth exists (the synthetic cohort; patch datasets that ship masks, e.g. GlaS), the pseudo masks are scored against it, and a
per-slide mosaic of the masks is written for QA.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.engine.training.batches import decode_batch
from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.method_config import classnet_config
from pbip_engine.jobs.resources import actor_pool_options, read_options, write_parquet_fresh
from pbip_engine.jobs.rundir import mask_relpath, synth_truth_dir, tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage

COLUMNS = ["tile_id", "slide_id", "x", "y", "size0", "image", "labels", "labelled"]


def load_classnet(model_path: str, bank_dir: str, cfg_dict: dict[str, Any], device: str = "cpu"):
    from pbip_engine.engine.training.stage1 import load_checkpoint
    from pbip_engine.methods.pbip.classnet import ClassNetConfig, build_classnet, load_prototypes_from_bank

    cfg = ClassNetConfig.from_dict(cfg_dict)
    cfg.pretrained = False  # the checkpoint carries every weight
    protos, k_list, names = load_prototypes_from_bank(bank_dir)
    model = build_classnet(cfg, protos, k_list, n_classes=len(names))
    load_checkpoint(model_path, model, map_location=device)
    return model.to(device).eval(), cfg


class PseudoPredictor:
    """Ray Data callable: one ClassNet per actor; writes each tile's mask PNG, returns the index rows."""

    def __init__(
        self, model_path: str, bank_dir: str, cfg: dict[str, Any], out_dir: str, pseudo: dict, colors
    ):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.cfg = load_classnet(model_path, bank_dir, cfg, self.device)
        self.out_dir = Path(out_dir)
        self.pseudo = pseudo
        self.colors = [(255, 255, 255), *colors]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pbip_engine.engine.pseudo.cams import write_palette_png
        from pbip_engine.engine.training.stage1 import predict_masks

        b = decode_batch(batch)
        masks, _ = predict_masks(
            self.model,
            b,
            self.cfg,
            self.device,
            background=self.pseudo["background"],
            white_threshold=self.pseudo["white_threshold"],
            min_size=self.pseudo["min_object"],
            power=self.pseudo["gamma"],
        )
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
    version = 3  # v2: samples/ Parquet (image + mask) for stage 2; v3: scored against patch masks
    deps = ("tile", "bank", "classnet")
    sections = ("classes", "pseudo")

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
                "model_path": str(model_path),
                "bank_dir": str(ctx.stage_dir("bank")),
                "cfg": asdict(classnet_config(spec)),
                "out_dir": str(ctx.work_dir),
                "pseudo": spec.pseudo.model_dump(),
                "colors": spec.class_colors,
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
