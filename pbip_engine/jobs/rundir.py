"""Where one stage leaves what another stage reads: the run directory's shared path conventions.

A stage module never imports another stage module; when two stages must agree on a file name or folder
(the tile stage's Parquet files, the embeddings folder, the model card, the pseudo masks, the cohort's
slides), the convention lives here, so it is written down once and changing it touches one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbip_engine.engine.wsi.slide_ids import slide_id
from pbip_engine.jobs.manifest import read_json
from pbip_engine.jobs.stage import StageContext
from pbip_engine.schemas.spec import JobSpec, expand_slides

MODEL_CARD = "model.json"  # beside the segmenter's weights


def stage1_model(ctx: StageContext) -> Path:
    """The stage-1 checkpoint the pseudo masks are read from, and stage 2 starts from (backbone_init: stage1)."""
    return ctx.stage_dir("classnet") / "best.pt"


def slide_id_of(path: Path) -> str:
    """A slide's id in every per-slide file name (the engine's one rule, shared with the writers)."""
    return slide_id(path)


def cohort_slides(ctx: StageContext) -> list[Path]:
    """The slides of the run: the spec's list, or the synthetic cohort's."""
    if ctx.spec.data.synthetic is not None:
        return sorted((ctx.stage_dir("synth") / "slides").glob("*.tif"))
    return expand_slides(ctx.spec.data.slides)


def synth_truth_dir(synth_dir: Path) -> Path:
    """The synthetic cohort's level-0 truth pyramids (``<slide id>.mask.tif``) in the synth stage's folder."""
    return synth_dir / "truth"


def tile_files(stage_dir: Path) -> list[Path]:
    """The per-slide Parquet files of a finished tile stage (failed slides have none)."""
    return sorted(p for p in (stage_dir / "tiles").glob("*.parquet") if not p.name.startswith("."))


def encoder_key(spec: JobSpec) -> str:
    """The encoder part of the embeddings folder's name, so a second encoder re-uses the same tiles."""
    from pbip_engine.engine.embed.encoders import encoder_id

    return encoder_id(spec.encoder.name, spec.encoder.checkpoint)


def embeddings_key(tile_dir: Path, spec: JobSpec) -> str:
    """Folder name of one (tiling, encoder, tile selection) triple's embeddings inside the embed stage's output."""
    tile_hash = (read_json(tile_dir / "manifest.json") or {}).get("input_hash", "")
    selection = "" if spec.encoder.tiles == "all" else f"__{spec.encoder.tiles}"
    return f"{tile_hash}__{encoder_key(spec)}{selection}"


def embeddings_path(stage_dir: Path, key: str) -> Path:
    return stage_dir / "embeddings" / key


def embeddings_dir(stage_dir: Path) -> Path:
    """The embeddings of a finished embed stage (its manifest names the key it wrote)."""
    m = read_json(stage_dir / "manifest.json") or {}
    return embeddings_path(stage_dir, m["embeddings_key"])


REGIONS = "regions"  # in the pseudo stage's folder: each slide's stitched regions, stage 2's crops


def mask_relpath(slide_id: str, x: int, y: int) -> str:
    """A pseudo mask's path inside the pseudo stage's folder, as its index records it."""
    return f"masks/{slide_id}/{x}_{y}.png"


def model_card(spec: JobSpec, arch: str) -> dict[str, Any]:
    """What ``pbip-engine segment`` needs to use a trained model without the spec (``arch``: as trained)."""
    return {
        "mpp": spec.tiling.mpp,
        # the crop stage 2 trains on = the inference context
        "tile_px": spec.segmenter.crop_px or spec.tiling.tile_px,
        "class_names": spec.class_names,
        "class_colors": [list(c) for c in spec.class_colors],
        "arch": arch,
        "backbone": spec.segmenter.backbone,
    }
