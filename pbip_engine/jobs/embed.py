"""``embed`` stage: tiles Parquet -> Ray Data actor pool running the encoder -> embeddings Parquet.

The model is loaded once per actor (a callable class); the pool autoscales between the spec's
``resources.autoscale.min`` and ``max`` actors, with ``gpus_per_worker`` GPUs each when asked.
Output rows are keyed by ``tile_id`` and the folder by (tiling hash, encoder id, tile selection), so a
second encoder re-uses the same tiles. ``encoder.tiles: bank`` embeds only the tiles the bank reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbip_engine.jobs.resources import actor_pool_options, read_options, write_parquet_fresh
from pbip_engine.jobs.rundir import embeddings_key, embeddings_path, tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, get_stage, register_stage
from pbip_engine.schemas.spec import JobSpec

EMBED_COLUMNS = ["tile_id", "slide_id", "x", "y", "white_fraction", "labelled", "labels", "image"]


class ArrowEmbedder:
    """Ray Data callable: the engine's Embedder, returning Arrow with the dataset's exact schema."""

    def __init__(self, **kwargs: Any) -> None:
        from pbip_engine.engine.embed.embedder import Embedder

        self.embedder = Embedder(**kwargs)

    def __call__(self, batch: dict[str, Any]):
        from pbip_engine.engine.embed.embedder import to_embeddings_table

        return to_embeddings_table(self.embedder(batch), self.embedder.schema())


@register_stage
class EmbedStage(Stage):
    name = "embed"
    deps = ("tile",)
    sections = ("encoder",)

    def not_needed(self, spec: JobSpec) -> str | None:
        """Only the bank reads tile embeddings: a method without a bank (gland) skips the encoder pass too."""
        if get_stage("bank").enabled(spec):
            return None
        return (
            f"method {spec.method.name!r} does not use a prototype bank, the only reader of tile embeddings"
        )

    def spec_json(self, spec: JobSpec) -> str:
        # Embedding every tile hashes as it did before encoder.tiles existed: such runs resume, not re-embed.
        drop = {"encoder": ["tiles"]} if spec.encoder.tiles == "all" else None
        return spec.section_json(*self.sections, drop=drop)

    def run(self, ctx: StageContext) -> StageResult:
        import ray

        spec = ctx.spec
        files = tile_files(ctx.stage_dir("tile"))
        if not files:
            raise RuntimeError("the tile stage produced no tiles (every slide failed?)")
        key = embeddings_key(ctx.stage_dir("tile"), spec)
        out_dir = embeddings_path(ctx.work_dir, key)
        ctx.ray()
        ds = ray.data.read_parquet([str(f) for f in files], columns=EMBED_COLUMNS, **read_options())
        if spec.encoder.tiles == "bank":
            # a light filter at the read tasks' CPU share, so it fuses with them; at a whole CPU it waited
            # forever behind the encoder pool on a 2-core machine
            ds = ds.map_batches(_bank_tiles, batch_format="pyarrow", **read_options())
        ds = ds.map_batches(
            ArrowEmbedder,
            fn_constructor_kwargs={
                "encoder": spec.encoder.name,
                "checkpoint": spec.encoder.checkpoint,
                "dtype": spec.encoder.dtype,
                "batch_size": spec.encoder.batch_size,
            },
            batch_size=spec.encoder.batch_size,
            batch_format="numpy",
            **actor_pool_options(spec.resources),
        )
        write_parquet_fresh(ds, out_dir)
        n = _count_rows(out_dir)
        return StageResult(
            counts={"tiles": n, "slides": len(files)},
            extra={"embeddings_key": key, "tiles_selected": spec.encoder.tiles},
        )


def _bank_tiles(batch):
    """Ray Data batch filter (before the encoder): only the tiles the bank builds from."""
    from pbip_engine.engine.prototypes.bank import keep_bank_tiles

    return keep_bank_tiles(batch)


def _count_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(folder.glob("*.parquet")))
