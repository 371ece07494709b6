"""``segmenter`` stage: stage 2 of every method, a segmenter trained on the pseudo masks with Ray Train DDP."""

from __future__ import annotations

from typing import Any

from pbip_engine.engine.training.batches import decode_samples
from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.ray_train import fit_on_ray, holdout_split
from pbip_engine.jobs.resources import read_options
from pbip_engine.jobs.rundir import MODEL_CARD, model_card
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.schemas.spec import JobSpec

SAMPLE_COLUMNS = ["tile_id", "image", "mask"]


def segmenter_arch(spec: JobSpec) -> str:
    from pbip_engine.methods import get_method

    return spec.segmenter.arch or get_method(spec.method.name).stage2_defaults(spec.method).arch


def segmenter_loss(spec: JobSpec) -> dict[str, Any]:
    """The stage-2 loss: ``segmenter.loss`` or the method's default, with its options (``segmenter.plf``)."""
    from pbip_engine.methods import get_method

    name = spec.segmenter.loss or get_method(spec.method.name).stage2_defaults(spec.method).loss
    return {"name": name, "options": spec.segmenter.plf.model_dump() if name == "plf" else {}}


def stage2_setup(config: dict[str, Any]):
    """Per-worker construction of the segmentation task (runs inside Ray Train workers)."""
    from pbip_engine.engine.nn.deeplab import build_segmenter
    from pbip_engine.engine.training.losses import stage2_loss
    from pbip_engine.engine.training.segmentation import SegmentationTask

    model = build_segmenter(config["arch"], n_classes=config["n_classes"], backbone=config["backbone"],
                            pretrained=config["pretrained"], crop_px=config.get("crop_px"))  # fmt: skip
    loss = config.get("loss") or {"name": "ce", "options": {}}
    task = SegmentationTask(model, amp=config["loop"]["amp"], loss=stage2_loss(loss["name"], loss["options"]))
    return task, decode_samples


@register_stage
class SegmenterStage(Stage):
    name = "segmenter"
    version = 4  # v4: the shared loop (one checkpoint format, per-sample augmentation, best.pt by validation)
    deps = ("pseudo",)
    sections = ("classes", "method", "segmenter")

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow.dataset as pads
        import ray

        spec = ctx.spec
        s = spec.segmenter
        samples = ctx.stage_dir("pseudo") / "samples"
        ctx.ray()
        ds = ray.data.read_parquet(str(samples), columns=SAMPLE_COLUMNS, **read_options())
        ids = (
            pads.dataset(str(samples), format="parquet").to_table(columns=["tile_id"])["tile_id"].to_pylist()
        )
        datasets, n = holdout_split(ds, ids, s.val_fraction)
        config = {
            "loop": {
                "epochs": s.epochs,
                "lr": s.lr,
                "weight_decay": s.weight_decay,
                "optimizer": "adamw",
                "schedule": "poly",
                "amp": s.amp,
                "augment": True,
                "seed": s.seed,
            },
            "arch": segmenter_arch(spec),
            "loss": segmenter_loss(spec),
            "backbone": s.backbone,
            "pretrained": s.backbone_checkpoint or True,
            "n_classes": len(spec.classes) + 1,
            "crop_px": spec.tiling.tile_px,  # ASPP rates fit the training tile (deeplab.fit_rates)
            "batch_size": s.batch_size,
            "n_train": n,
        }
        history = fit_on_ray(
            "segmenter", stage2_setup, config, datasets, spec.resources,
            storage=ctx.work_dir / "ray_train", out_dir=ctx.work_dir,
        )  # fmt: skip
        write_json_atomic(ctx.work_dir / MODEL_CARD, model_card(spec, config["arch"]))
        last = history[-1]
        ctx.log(
            f"[segmenter] {len(history)} epoch(s) on {n} pseudo-labelled tiles; last loss {last.get('loss'):.4f}"
        )
        return StageResult(counts={"epochs": len(history), "samples": n},
                           extra={"last_epoch": {k: v for k, v in last.items() if k != "val"}})  # fmt: skip
