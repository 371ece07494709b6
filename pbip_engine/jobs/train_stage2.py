"""``segmenter`` stage: PBIP stage 2, DeepLab trained on the pseudo masks with Ray Train DDP."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pbip_engine.engine.training.batches import decode_batch, decode_masks
from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.ray_train import augment, fit_on_ray
from pbip_engine.jobs.resources import read_options
from pbip_engine.jobs.rundir import MODEL_CARD, model_card
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage

SAMPLE_COLUMNS = ["tile_id", "image", "mask"]


def segmenter_setup(config: dict[str, Any], device) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    from pbip_engine.engine.nn.deeplab import build_segmenter
    from pbip_engine.engine.training.stage2 import (
        SegTrainConfig,
        make_optimizer,
        make_scaler,
        resume_from,
        save_checkpoint,
        train_one_epoch,
    )
    from pbip_engine.methods.pbip.classnet import unwrap

    cfg = SegTrainConfig(**config["train"])
    model = build_segmenter(
        config["arch"],
        n_classes=config["n_classes"],
        backbone=config["backbone"],
        pretrained=config["pretrained"],
    )
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model, cfg)
    scaler = make_scaler(device, cfg.amp)
    world = ray.train.get_context().get_world_size()
    steps_per_epoch = math.ceil(config["n_samples"] / (config["batch_size"] * world))
    total = steps_per_epoch * config["epochs"]
    step = [0]

    def epoch_fn(shard, epoch: int) -> dict[str, Any]:
        def batches():
            for i, b in enumerate(
                shard.iter_batches(
                    batch_size=config["batch_size"],
                    batch_format="numpy",
                    local_shuffle_buffer_size=config["batch_size"] * 20,
                    local_shuffle_seed=epoch,
                )
            ):
                out = decode_batch({"image": b["image"], "tile_id": b["tile_id"]})
                out["mask"] = decode_masks(b["mask"])
                yield augment_pair(out, seed=epoch * 1_000_003 + i)

        stats = train_one_epoch(
            model, batches(), opt, cfg, scaler=scaler, start_step=step[0], total_steps=total
        )
        step[0] += int(stats["steps"])
        return dict(stats)

    def load_fn(path):
        info = resume_from(path, unwrap(model), opt, scaler=scaler, map_location=device)
        step[0] = int(info.get("step") or 0)
        return info

    return {
        "epoch_fn": epoch_fn,
        "save_fn": lambda path, epoch, metrics: save_checkpoint(
            path, unwrap(model), opt, epoch, metrics, step=step[0], cfg=cfg, scaler=scaler
        ),
        "load_fn": load_fn,
    }


def augment_pair(batch: dict[str, Any], seed: int) -> dict[str, Any]:
    """The same flips/rotation for image and mask."""
    stacked = np.concatenate([batch["image"], batch["mask"][..., None]], axis=-1)
    out = augment({"image": stacked}, seed)["image"]
    return {**batch, "image": np.ascontiguousarray(out[..., :3]), "mask": np.ascontiguousarray(out[..., 3])}


@register_stage
class SegmenterStage(Stage):
    name = "segmenter"
    version = 3  # v3: model.json card beside the weights
    deps = ("pseudo",)
    sections = ("classes", "segmenter")

    def run(self, ctx: StageContext) -> StageResult:
        import ray

        spec = ctx.spec
        s = spec.segmenter
        samples = ctx.stage_dir("pseudo") / "samples"
        ctx.ray()
        ds = ray.data.read_parquet(str(samples), columns=SAMPLE_COLUMNS, **read_options())
        n = ds.count()
        config = {
            "train": {
                "optimizer": "adamw",
                "lr": s.lr,
                "weight_decay": s.weight_decay,
                "epochs": s.epochs,
                "amp": s.amp,
                "hflip": False,  # augment_pair already flips/rotates image and mask together
                "vflip": False,
            },
            "arch": s.arch,
            "backbone": s.backbone,
            "pretrained": s.backbone_checkpoint or True,
            "n_classes": len(spec.classes) + 1,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "n_samples": n,
        }
        history = fit_on_ray(
            "segmenter",
            segmenter_setup,
            config,
            {"train": ds},
            spec.resources,
            storage=ctx.work_dir / "ray_train",
            out_dir=ctx.work_dir,
        )
        write_json_atomic(ctx.work_dir / MODEL_CARD, model_card(spec))
        last = history[-1]
        ctx.log(
            f"[segmenter] {len(history)} epoch(s) on {n} pseudo-labelled tiles; last loss {last.get('loss')}"
        )
        return StageResult(counts={"epochs": len(history), "samples": n}, extra={"last_epoch": last})
