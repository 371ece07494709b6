"""``segmenter`` stage: stage 2 of every method, a segmenter trained on the pseudo masks (or
the method's own labels, e.g. mpamatch's) with Ray Train DDP."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from pbip_engine.engine.training.batches import decode_samples
from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.ray_train import fit_on_ray, holdout_split
from pbip_engine.jobs.resources import labelled_rows, read_options
from pbip_engine.jobs.rundir import MODEL_CARD, REGIONS, model_card, stage1_model, synth_truth_dir, tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.schemas.spec import JobSpec

SAMPLE_COLUMNS = ["tile_id", "image", "mask"]
TILE_COLUMNS = ["tile_id", "slide_id", "x", "y", "size0", "tile_px", "image"]


def segmenter_arch(spec: JobSpec) -> str:
    from pbip_engine.methods import get_method

    return spec.segmenter.arch or get_method(spec.method.name).stage2_defaults(spec.method).arch


def segmenter_loss(spec: JobSpec) -> dict[str, Any]:
    """The stage-2 loss: ``segmenter.loss`` or the method's default, with its options (``segmenter.plf``,
    ``segmenter.dice_weight``)."""
    from pbip_engine.methods import get_method

    name = spec.segmenter.loss or get_method(spec.method.name).stage2_defaults(spec.method).loss
    options = {"plf": spec.segmenter.plf.model_dump(), "ce_dice": {"dice_weight": spec.segmenter.dice_weight}}
    return {"name": name, "options": options.get(name, {})}


def stage2_setup(config: dict[str, Any]):
    """Per-worker construction of the segmentation task (runs inside Ray Train workers)."""
    from pbip_engine.engine.nn.deeplab import build_segmenter
    from pbip_engine.engine.training.losses import stage2_loss
    from pbip_engine.engine.training.segmentation import SegmentationTask
    from pbip_engine.methods import get_method

    spec = config.get("spec")
    task = get_method(spec.method.name).stage2_task(spec.method, spec, config) if spec is not None else None
    if task is not None:  # the method's own stage-2 task (Method.stage2_task)
        return task, decode_samples

    model = build_segmenter(config["arch"], n_classes=config["n_classes"], backbone=config["backbone"],
                            pretrained=config["pretrained"], crop_px=config.get("crop_px"),
                            separable=config.get("separable", True))  # fmt: skip
    if config.get("init_backbone"):  # segmenter.backbone_init: stage1
        from pbip_engine.engine.nn.backbones import load_into
        from pbip_engine.engine.training.checkpoint import submodule_weights

        path = config["init_backbone"]
        model.backbone.load_report = load_into(  # tensors it lacks keep their ImageNet weights
            model.backbone, submodule_weights(path, "backbone."), source=path, drop_prefixes=()
        )
    loss = config.get("loss") or {"name": "ce", "options": {}}
    loss_fn = stage2_loss(loss["name"], loss["options"], class_weights=loss.get("class_weights"))
    task = SegmentationTask(model, amp=config["loop"]["amp"], loss=loss_fn)
    crops = config.get("region_crops")
    if crops:  # segmenter.crop_px: random scaled crops of the stitched regions
        from pbip_engine.engine.training.region_crops import RegionCrops

        rank = 0
        with contextlib.suppress(Exception):  # outside Ray Train (tests): rank 0
            import ray.train

            rank = ray.train.get_context().get_world_rank()
        return task, RegionCrops(crops["crop_px"], tuple(crops["zoom"]), crops["jitter"],
                                 seed=crops["seed"] * 1000 + rank)  # fmt: skip
    return task, decode_samples


def repeated(ds: Any, times: int) -> Any:
    """A Ray dataset ``times`` over (a union of itself): how one epoch sees each row ``times`` times."""
    return ds.union(*[ds] * (times - 1)) if times > 1 else ds


# Masks read to count class pixels for segmenter.class_weights: balanced: a stable frequency, cheap on a cohort.
WEIGHT_SAMPLE_MASKS = 4096


def loss_class_weights(spec: JobSpec, masks: Path) -> tuple[list[float] | None, dict[str, Any]]:
    """``segmenter.class_weights`` as a list (background first) and what to record of it; ``balanced`` counts
    the class pixels of up to ``WEIGHT_SAMPLE_MASKS`` pseudo masks (evenly spaced) of the Parquet ``masks``."""
    import pyarrow.dataset as pads

    from pbip_engine.engine.training.batches import decode_masks
    from pbip_engine.engine.training.losses import balanced_weights, mask_class_counts

    w = spec.segmenter.class_weights
    if w is None or isinstance(w, list):
        return w, {} if w is None else {"class_weights": w}
    ds = pads.dataset(str(masks), format="parquet")
    rows = ds.count_rows()
    step = max(1, math.ceil(rows / WEIGHT_SAMPLE_MASKS))
    pngs = ds.take(list(range(0, rows, step)), columns=["mask"]).column("mask").to_pylist()
    counts = mask_class_counts(decode_masks(pngs, stack=False), len(spec.classes) + 1)
    weights = balanced_weights(counts)
    return weights, {
        "class_weights": weights,
        "class_pixels": [int(c) for c in counts],
        "weight_masks": len(pngs),
    }


def region_datasets(ctx: StageContext, s: Any) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """The pseudo stage's stitched regions, split by id hash, the training part repeated so that one epoch
    draws ``crops_per_epoch`` x (regions' area / crop area) crops. Returns datasets, rows per epoch, record."""
    import pyarrow.dataset as pads
    import ray

    from pbip_engine.engine.training.split import is_validation

    folder = ctx.stage_dir("pseudo") / REGIONS
    files = sorted(str(f) for f in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise RuntimeError(f"segmenter.crop_px needs the pseudo stage's stitched regions, none in {folder} "
                           "(is pseudo.stitch on?)")  # fmt: skip
    meta = pads.dataset(files, format="parquet").to_table(columns=["tile_id", "width", "height"]).to_pylist()
    ds = ray.data.read_parquet(files, columns=SAMPLE_COLUMNS, **read_options())
    datasets, n = holdout_split(ds, [r["tile_id"] for r in meta], s.val_fraction)
    train = [r for r in meta if not is_validation(r["tile_id"], s.val_fraction)]
    area_px = sum(r["width"] * r["height"] for r in train)  # at tiling.mpp, where the crops are cut
    repeat = max(1, math.ceil(s.crops_per_epoch * area_px / (s.crop_px**2 * max(n, 1))))
    datasets["train"] = repeated(datasets["train"], repeat)
    record = {"regions": len(meta), "train_regions": n, "repeat": repeat, "crop_px": s.crop_px}
    ctx.log(f"[segmenter] {n} stitched regions (+{len(meta) - n} held out), {repeat} crop(s) of "
            f"{s.crop_px} px from each per epoch")  # fmt: skip
    return datasets, n * repeat, record


@register_stage
class SegmenterStage(Stage):
    name = "segmenter"
    # v4: the shared loop (one checkpoint format, per-sample augmentation, best.pt by validation);
    # v5: segmenter.crop_px trains on crops of the pseudo stage's stitched regions; v6: segmenter.class_weights
    version = 6
    deps = ("synth", "tile", "pseudo")  # synth/tile: methods with their own labels (Method.stage2_labels)
    sections = ("classes", "method", "segmenter")

    def dependencies(self, spec: JobSpec) -> tuple[str, ...]:
        deps = super().dependencies(spec)  # + the stage-1 model it starts from (segmenter.backbone_init)
        return (*deps, "classnet") if spec.segmenter.backbone_init == "stage1" else deps

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow.dataset as pads
        import ray

        from pbip_engine.methods import get_method

        spec = ctx.spec
        s = spec.segmenter
        truth = synth_truth_dir(ctx.stage_dir("synth")) if "synth" in self.dependencies(spec) else None
        own = get_method(spec.method.name).stage2_labels(spec.method, spec, truth)
        ctx.ray()
        regions = None
        if own is not None:
            if s.crop_px is not None:
                raise RuntimeError(f"segmenter.crop_px: method {spec.method.name!r} trains stage 2 on its own "
                                   "labelled tiles, not on stitched pseudo-mask regions; unset it")  # fmt: skip
            datasets, n, split = own_label_datasets(ctx, own, s.val_fraction)
        elif s.crop_px is not None:
            datasets, n, regions = region_datasets(ctx, s)
            split = None
        else:
            samples = ctx.stage_dir("pseudo") / "samples"
            ds = ray.data.read_parquet(str(samples), columns=SAMPLE_COLUMNS, **read_options())
            ids = (
                pads.dataset(str(samples), format="parquet")
                .to_table(columns=["tile_id"])["tile_id"]
                .to_pylist()
            )
            datasets, n = holdout_split(ds, ids, s.val_fraction)
            split = None
        weights, weight_record = None, {}
        if own is None:  # trained on pseudo masks: they are what the class weights count
            masks = ctx.stage_dir("pseudo") / (REGIONS if regions is not None else "samples")
            weights, weight_record = loss_class_weights(spec, masks)
        if weight_record.get("class_pixels"):
            ctx.log(f"[segmenter] class weights {[round(w, 3) for w in weights]} (balanced: class pixels "
                    f"{weight_record['class_pixels']} in {weight_record['weight_masks']} pseudo masks)")  # fmt: skip
        init = str(stage1_model(ctx)) if s.backbone_init == "stage1" else None  # segmenter.backbone_init
        config = {
            "loop": {
                "epochs": s.epochs,
                "lr": s.lr,
                "weight_decay": s.weight_decay,
                "optimizer": "adamw",
                "schedule": "poly",
                "ema_epochs": s.ema_epochs,
                "amp": s.amp,
                "augment": True,
                "seed": s.seed,
            },
            "arch": segmenter_arch(spec),
            "loss": {**segmenter_loss(spec), "class_weights": weights},
            "backbone": s.backbone,
            "separable": s.separable,
            "pretrained": s.backbone_checkpoint or True,
            "init_backbone": init,
            "n_classes": len(spec.classes) + 1,
            "crop_px": s.crop_px
            or spec.tiling.tile_px,  # ASPP rates fit the training crop (deeplab.fit_rates)
            "region_crops": None
            if regions is None
            else {"crop_px": s.crop_px, "zoom": list(s.zoom), "jitter": s.jitter, "seed": s.seed},
            "batch_size": s.batch_size,
            "n_train": n,
            "spec": spec,
        }
        history = fit_on_ray(
            "segmenter", stage2_setup, config, datasets, spec.resources,
            storage=ctx.work_dir / "ray_train", out_dir=ctx.work_dir,
        )  # fmt: skip
        write_json_atomic(ctx.work_dir / MODEL_CARD, model_card(spec, config["arch"]))
        last = history[-1]
        ctx.log(
            f"[segmenter] {len(history)} epoch(s) on {n} {'region crops' if regions else 'pseudo-labelled tiles'}"
            f" per epoch; last loss {last.get('loss'):.4f}"
        )
        extra = {"last_epoch": {k: v for k, v in last.items() if k != "val"}, "backbone_init": s.backbone_init,
                 **weight_record}  # fmt: skip
        if regions is not None:
            extra["regions"] = regions
        if split is not None:
            extra["labelled_split"] = split
        return StageResult(counts={"epochs": len(history), "samples": n}, extra=extra)


def own_label_datasets(ctx: StageContext, own: Any, val_fraction: float) -> tuple[dict[str, Any], int, dict]:
    """Tiles + the method's masks (``Method.stage2_labels``): train = unlabelled tiles (if kept) + labelled
    tiles ``repeat`` times; val = labelled tiles held out by the tile-id hash. Returns the split record too."""
    import pyarrow.dataset as pads
    import ray

    from pbip_engine.engine.training.split import is_validation

    files = [str(f) for f in tile_files(ctx.stage_dir("tile"))]
    rows = pads.dataset(files, format="parquet").to_table(columns=["tile_id", "slide_id"]).to_pylist()
    labelled = set(own.labelled)
    lab_ids = [r["tile_id"] for r in rows if r["slide_id"] in labelled]
    if not lab_ids:
        raise RuntimeError(f"no tiles of the labelled images {sorted(labelled)[:5]} (did they fail tiling?)")
    n_val = sum(1 for t in lab_ids if is_validation(t, val_fraction))
    n_lab = len(lab_ids) - n_val
    n_unl = len(rows) - len(lab_ids) if own.unlabelled else 0
    repeat = own.repeat or max(1, round(n_unl / max(1, n_lab)))
    ds = ray.data.read_parquet(files, columns=TILE_COLUMNS, **read_options())
    ds = ds.map_batches(own.attach, batch_format="numpy", **read_options())
    lab = labelled_rows(ds)
    parts, _ = holdout_split(lab, lab_ids, val_fraction)
    train = repeated(parts["train"], repeat)
    if n_unl:
        train = train.union(labelled_rows(ds, False))
    # fractional CPUs like every op above: at Ray Data's default of 1 CPU, a Train worker holding all of a
    # node's CPUs (cpus_per_worker = node CPUs, as in examples/glas-semi.yaml on 2 cores) starves this op
    # and the first epoch never starts
    datasets = {"train": train.drop_columns(["slide_id", "x", "y", "size0", "tile_px"], **read_options())}
    if "val" in parts:
        datasets["val"] = parts["val"].drop_columns(
            ["slide_id", "x", "y", "size0", "tile_px", "labelled"], **read_options()
        )
    record = {**(own.record or {}), "labelled_tiles": n_lab, "val_tiles": n_val, "unlabelled_tiles": n_unl,
              "repeat": repeat}  # fmt: skip
    ctx.log(f"[segmenter] own labels: {len(labelled)} labelled image(s), {n_lab} train + {n_val} val tiles "
            f"(x{repeat}), {n_unl} unlabelled tiles")  # fmt: skip
    return datasets, n_lab * repeat + n_unl, record
