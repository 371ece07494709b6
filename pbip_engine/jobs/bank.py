"""``bank`` stage: per-class cosine K-means prototypes (PBIP §3.2), a gallery PNG and a zero-shot check."""

from __future__ import annotations

from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.rundir import embeddings_dir, tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage


@register_stage
class BankStage(Stage):
    name = "bank"
    deps = ("embed",)
    sections = ("classes", "bank")

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow.dataset as pads

        from pbip_engine.engine.prototypes.bank import BankParams, build_bank
        from pbip_engine.engine.prototypes.gallery import write_gallery
        from pbip_engine.engine.prototypes.tile_fetch import tile_fetcher

        spec = ctx.spec
        edir = embeddings_dir(ctx.stage_dir("embed"))
        # Ray Data writes rows in the order batches finish: sort, so the holdout split and k-means start
        # (both row-order dependent) give the same bank for the same embeddings.
        table = pads.dataset(str(edir), format="parquet").to_table().sort_by("tile_id")
        encoder = table["encoder"][0].as_py() if table.num_rows else spec.encoder.name
        params = BankParams(**spec.bank.model_dump())
        bank_only = spec.encoder.tiles == "bank"
        bank, report = build_bank(
            table, spec.class_names, encoder, params, log=ctx.log, bank_tiles_only=bank_only
        )
        bank.save(ctx.work_dir)
        write_json_atomic(ctx.work_dir / "report.json", report)
        fetch = tile_fetcher(tile_files(ctx.stage_dir("tile")))
        fetch.prefetch([t for members in bank.members for t in members])
        write_gallery(ctx.work_dir / "gallery.png", bank, fetch)
        zs = report.get("zero_shot", {})
        per_class = {c: round(v["f1"], 3) for c, v in zs.get("per_class", {}).items()}
        ctx.log(f"[bank] zero-shot macro F1 {zs.get('macro_f1', float('nan')):.3f}; per class {per_class}")
        return StageResult(
            counts={"prototypes": int(bank.prototypes.shape[0]), "classes": len(bank.class_names)},
            extra={"zero_shot_macro_f1": zs.get("macro_f1")},
        )
