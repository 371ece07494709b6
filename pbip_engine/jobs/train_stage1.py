"""``classnet`` stage: PBIP stage 1 (prototype CAMs + FG/BG matching) trained with Ray Train DDP."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pbip_engine.engine.training.batches import decode_batch
from pbip_engine.jobs.method_config import classnet_config
from pbip_engine.jobs.ray_train import augment, fit_on_ray
from pbip_engine.jobs.resources import read_options
from pbip_engine.jobs.rundir import tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage

TRAIN_COLUMNS = ["tile_id", "image", "labels", "labelled"]


def classnet_setup(config: dict[str, Any], device) -> dict[str, Any]:
    """Per-worker construction (runs inside Ray Train workers, and in the Ray-free path)."""
    import ray.train.torch

    from pbip_engine.engine.embed.encoders import create_encoder
    from pbip_engine.engine.training.stage1 import (
        load_checkpoint,
        make_grad_scaler,
        make_optimizer,
        save_checkpoint,
        train_one_epoch,
    )
    from pbip_engine.methods.pbip.classnet import (
        ClassNetConfig,
        build_classnet,
        freeze_encoder,
        load_prototypes_from_bank,
        unwrap,
    )

    cfg = ClassNetConfig.from_dict(config["cfg"])
    protos, k_list, names = load_prototypes_from_bank(config["bank_dir"])
    model = build_classnet(cfg, protos, k_list, n_classes=len(names))
    encoder = None
    if cfg.use_sim:
        encoder = freeze_encoder(create_encoder(config["encoder"], config["encoder_checkpoint"])).to(device)
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model, cfg)
    scaler = make_grad_scaler(cfg, device)

    def epoch_fn(shard, epoch: int) -> dict[str, Any]:
        batches = (
            augment(decode_batch(b), seed=epoch * 1_000_003 + i)
            for i, b in enumerate(
                shard.iter_batches(
                    batch_size=cfg.batch_size,
                    batch_format="numpy",
                    local_shuffle_buffer_size=cfg.batch_size * 20,
                    local_shuffle_seed=epoch,
                )
            )
        )
        return train_one_epoch(model, encoder, batches, opt, cfg, device, scaler=scaler, log_every=10**9)

    return {
        "epoch_fn": epoch_fn,
        "save_fn": lambda path, epoch, metrics: save_checkpoint(
            path, unwrap(model), opt, epoch, metrics, cfg=cfg, scaler=scaler
        ),
        "load_fn": lambda path: load_checkpoint(path, unwrap(model), opt, scaler=scaler, map_location=device),
    }


@register_stage
class ClassNetStage(Stage):
    name = "classnet"
    deps = ("tile", "bank")
    sections = ("classes", "encoder", "classnet")

    def run(self, ctx: StageContext) -> StageResult:
        import ray

        spec = ctx.spec
        files = tile_files(ctx.stage_dir("tile"))
        ctx.ray()
        ds = ray.data.read_parquet([str(f) for f in files], columns=TRAIN_COLUMNS, **read_options())
        ds = ds.filter(lambda row: bool(row["labelled"]), **read_options())  # fuses into the read
        cfg = classnet_config(spec)
        config = {
            "cfg": asdict(cfg),
            "bank_dir": str(ctx.stage_dir("bank")),
            "encoder": spec.encoder.name,
            "encoder_checkpoint": spec.encoder.checkpoint,
            "epochs": spec.classnet.epochs,
        }
        history = fit_on_ray(
            "classnet",
            classnet_setup,
            config,
            {"train": ds},
            spec.resources,
            storage=ctx.work_dir / "ray_train",
            out_dir=ctx.work_dir,
        )
        last = history[-1]
        ctx.log(
            f"[classnet] {len(history)} epoch(s); last: loss {last.get('total', float('nan')):.4f} "
            f"{last.get('images_per_s', 0):.1f} img/s on {last.get('world_size')} worker(s)"
        )
        return StageResult(
            counts={"epochs": len(history), "workers": last.get("world_size")},
            extra={"last_epoch": last},
        )
