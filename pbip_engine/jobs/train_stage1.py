"""``classnet`` stage: the method's stage-1 network (PBIP: ClassNet CAMs) trained with Ray Train DDP.

The method (spec ``method:``) builds the training task; the loop settings come from ``stage1:``. Nothing
here is specific to one method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbip_engine.engine.training.batches import decode_batch
from pbip_engine.jobs.ray_train import fit_on_ray, holdout_split
from pbip_engine.jobs.resources import labelled_rows, read_options
from pbip_engine.jobs.rundir import tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.methods import Stage1Inputs, get_method
from pbip_engine.schemas.spec import JobSpec, SpecError

TRAIN_COLUMNS = ["tile_id", "image", "labels", "labelled"]


def loop_config(spec: JobSpec) -> dict[str, Any]:
    s = spec.stage1
    return {"epochs": s.epochs, "lr": s.lr, "weight_decay": s.weight_decay, "optimizer": "adamw",
            "schedule": s.schedule, "grad_clip": s.grad_clip, "amp": s.amp, "augment": True, "seed": s.seed}  # fmt: skip


def stage1_setup(config: dict[str, Any]):
    """Per-worker construction of the method's task (runs inside Ray Train workers)."""
    from pbip_engine.methods import Stage1Inputs, get_method

    spec = config["spec"]
    method = get_method(spec.method.name)
    task = method.stage1_task(spec.method, Stage1Inputs.from_spec(spec, config["bank_dir"]))
    return task, decode_batch


@register_stage
class ClassNetStage(Stage):
    name = "classnet"
    version = 2  # v2: method plug-ins, one checkpoint format, epochs from 1, best.pt by validation
    deps = ("tile", "bank")
    sections = ("classes", "encoder", "method", "stage1")

    def spec_json(self, spec: JobSpec) -> str:
        # the method's read-out keys change the pseudo masks, not the trained model: no retraining for them
        return spec.section_json(*self.sections, drop={"method": get_method(spec.method.name).readout_keys})

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow.dataset as pads
        import ray

        spec = ctx.spec
        files = [str(f) for f in tile_files(ctx.stage_dir("tile"))]
        rows = (
            pads.dataset(files, format="parquet")
            .to_table(columns=["tile_id", "labelled", "labels"])
            .to_pylist()
        )
        labelled = [r["tile_id"] for r in rows if r["labelled"]]
        method = get_method(spec.method.name)
        per_class = {c: sum(1 for r in rows if r["labelled"] and r["labels"][i] > 0.5)
                     for i, c in enumerate(spec.class_names)}  # fmt: skip
        problem = method.check_labels(spec.method, per_class)
        if problem:
            raise SpecError(problem)
        ctx.ray()
        ds = ray.data.read_parquet(files, columns=TRAIN_COLUMNS, **read_options())
        ds = labelled_rows(ds)  # pushed into the read
        datasets, n_train = holdout_split(ds, labelled, spec.stage1.val_fraction)
        bank = ctx.stage_dir("bank") if "bank" in self.dependencies(spec) else None
        config = {
            "spec": spec,
            "bank_dir": str(bank) if bank else None,
            "loop": loop_config(spec),
            "batch_size": spec.stage1.batch_size,
            "n_train": n_train,  # the poly schedule's length from the first epoch on
            "run_config": {"method": spec.method.model_dump(mode="json"), "classes": spec.class_names},
        }
        history = fit_on_ray(
            "classnet", stage1_setup, config, datasets, spec.resources,
            storage=ctx.work_dir / "ray_train", out_dir=ctx.work_dir,
        )  # fmt: skip
        inputs = Stage1Inputs.from_spec(spec, config["bank_dir"])
        extra = method.after_stage1(
            spec.method, ctx.work_dir / "best.pt", inputs, ctx.work_dir, [Path(f) for f in files]
        )
        last = history[-1]
        ctx.log(
            f"[classnet] {spec.method.name}: {len(history)} epoch(s); last: loss {last.get('loss', float('nan')):.4f} "
            f"{last.get('images_per_s', 0):.1f} img/s on {last.get('world_size')} worker(s)"
        )
        return StageResult(
            counts={"epochs": len(history), "workers": last.get("world_size")},
            extra={
                "last_epoch": {k: v for k, v in last.items() if k != "val"},
                "method": spec.method.name,
                **extra,
            },
        )
