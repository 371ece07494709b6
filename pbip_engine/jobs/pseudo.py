"""``pseudo`` stage: ClassNet CAMs -> per-tile pseudo masks (palettised PNG + Parquet index) on an actor pool.

Masks are restricted to each tile's image-level classes; background follows ``pseudo.background``.
Where ground truth exists (the synthetic cohort; patch datasets that ship masks, e.g. GlaS), the pseudo masks are scored against it, and a
per-slide mosaic of the masks is written for QA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.method_config import classnet_config
from pbip_engine.jobs.ray_train import decode_batch
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


def truth_region(truth: Any, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
    """Level-0 truth crop resized (nearest) to the tile's pixel grid."""
    import cv2

    crop = np.asarray(truth[y : y + size0, x : x + size0])
    return cv2.resize(crop, (out_px, out_px), interpolation=cv2.INTER_NEAREST)


def open_truth(path: Path):
    """Level 0 of a label pyramid as a lazily read array (zarr over the TIFF's tiles)."""
    import tifffile
    import zarr

    store = tifffile.imread(str(path), aszarr=True, level=0)
    return zarr.open(store, mode="r")


def synth_truth(truth_dir: Path) -> Callable[[str], Any]:
    """Slide id -> lazily read level-0 truth of the synthetic cohort (None where there is none)."""

    def get(sid: str) -> Any:
        p = truth_dir / f"{sid}.mask.tif"
        return open_truth(p) if p.exists() else None

    return get


def patch_truth(fmt: str, root: str) -> Callable[[str], Any] | None:
    """Source image -> its mask in our convention, for patch datasets that ship masks (GlaS); else None."""
    from pbip_engine.engine.ingest.datasets.common import DataError
    from pbip_engine.engine.ingest.patch_tiles import open_patch_dataset

    ds = open_patch_dataset(fmt, root, split="train")
    if not hasattr(ds, "mask"):
        return None

    def get(sid: str) -> Any:
        try:
            return ds.mask(sid)
        except DataError:
            return None

    return get


def score_pseudo(
    index: list[dict[str, Any]], out_dir: Path, truth_for: Callable[[str], Any], n_classes: int
) -> dict:
    """Pseudo masks vs truth over all tiles: one confusion matrix, pixels whose truth is a tissue class.

    ``multi_label`` repeats the scores over tiles labelled with two or more classes: on a single-label
    tile the mask is that class plus the background rule whatever the CAMs say, so only these tiles
    show how well the model localises (the L_CLS vs + L_SIM ablation reads this figure).
    """
    from pbip_engine.engine.metrics import SegmentationMeter, read_mask

    meter = SegmentationMeter(n_classes, ignore_background=True)
    multi = SegmentationMeter(n_classes, ignore_background=True)
    truths: dict[str, Any] = {}
    for row in index:
        sid = row["slide_id"]
        if sid not in truths:
            truths[sid] = truth_for(sid)
        if truths[sid] is None:
            continue
        pred = read_mask(out_dir / row["mask_path"])
        truth = truth_region(truths[sid], row["x"], row["y"], row["size0"], pred.shape[0])
        meter.update(pred, truth, name=sid)
        if np.asarray(row.get("labels", ())).sum() > 1:  # a list, or an ndarray from Ray's tensor columns
            multi.update(pred, truth, name=sid)
    if not meter.n_images:
        return {}
    out = meter.compute()
    if multi.n_images:
        out["multi_label"] = multi.compute()
    return out


def slide_mosaics(index: list[dict[str, Any]], out_dir: Path, colors, max_px: int = 1024) -> int:
    """One QA picture per slide: every tile's pseudo mask placed at its position."""
    import cv2

    from pbip_engine.engine.metrics import read_mask

    palette = np.array([(255, 255, 255), *colors], dtype=np.uint8)
    by_slide: dict[str, list[dict[str, Any]]] = {}
    for r in index:
        by_slide.setdefault(r["slide_id"], []).append(r)
    for sid, rows in by_slide.items():
        w = max(r["x"] + r["size0"] for r in rows)
        h = max(r["y"] + r["size0"] for r in rows)
        s = max_px / max(w, h)
        canvas = np.full((int(h * s) + 1, int(w * s) + 1, 3), 255, np.uint8)
        for r in rows:
            m = read_mask(out_dir / r["mask_path"])
            e = max(1, round(r["size0"] * s))
            x0, y0 = int(r["x"] * s), int(r["y"] * s)
            canvas[y0 : y0 + e, x0 : x0 + e] = palette[
                cv2.resize(m, (e, e), interpolation=cv2.INTER_NEAREST)
            ][: canvas.shape[0] - y0, : canvas.shape[1] - x0]
        path = out_dir / "heatmaps" / f"{sid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), canvas[:, :, ::-1])
    return len(by_slide)


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
