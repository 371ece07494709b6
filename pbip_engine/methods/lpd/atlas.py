"""LPD's prototype atlas: for each learned prototype, the labelled tiles of its class it activates most.

Scores are the prototype's cosine map at the diversity level (the stage whose features the regulariser
spreads the prototypes over), max-pooled over the tile; a tile counts for class c's prototypes only if it
is labelled c. The drawing is ``engine.prototypes.atlas``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pbip_engine.engine.ingest.datasets.common import decode_rgb
from pbip_engine.engine.prototypes.atlas import AtlasRow, write_atlas
from pbip_engine.engine.training.inputs import to_model_input
from pbip_engine.methods.lpd.model import LpdNet, LpdNetConfig
from pbip_engine.methods.pbip.classnet import resize_input


def read_labelled_tiles(files: Sequence[Path], limit: int) -> tuple[list[str], list[bytes], np.ndarray]:
    """(tile ids, encoded images, labels [T, N]) of up to ``limit`` labelled tiles, evenly spread over the
    cohort in tile-id order (deterministic)."""
    import pyarrow.dataset as pads

    table = pads.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["tile_id", "labelled", "labels"]
    )
    rows = [(t, i) for i, (t, ok) in enumerate(zip(table["tile_id"].to_pylist(), table["labelled"].to_pylist(), strict=True)) if ok]  # fmt: skip
    rows.sort()
    if limit and len(rows) > limit:
        rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, limit)]
    keep = sorted(i for _, i in rows)
    full = pads.dataset([str(f) for f in files], format="parquet").to_table(columns=["tile_id", "image"])
    ids = [table["tile_id"][i].as_py() for i in keep]
    images = [full["image"][i].as_py() for i in keep]
    labels = np.asarray([table["labels"][i].as_py() for i in keep], np.float32).reshape(len(keep), -1)
    return ids, images, labels


@torch.inference_mode()
def prototype_maps(
    model: LpdNet, cfg: LpdNetConfig, images: Sequence[bytes], device: torch.device | str, batch: int = 64
) -> np.ndarray:
    """[T, N*k, h, w] float16 cosine maps of every prototype at the diversity level."""
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        rgb = np.stack([decode_rgb(b) for b in images[s : s + batch]])
        x = to_model_input({"image": rgb}, cfg.mean, cfg.std, device)["image"]
        o = model(resize_input(x, cfg.input_px))  # the network's training input size
        cos = o["subclass_cams"][cfg.div_level] / o["scales"][cfg.div_level]
        out.append(cos.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


def atlas_rows(
    class_names: Sequence[str],
    k: int,
    maps: np.ndarray,
    labels: np.ndarray,
    fetch: Callable[[int], np.ndarray],
    per_row: int = 6,
) -> list[AtlasRow]:
    """One row per prototype (class-major): its ``per_row`` best tiles of its class with their maps."""
    scores = maps.reshape(maps.shape[0], maps.shape[1], -1).max(-1).astype(np.float32)  # [T, M]
    rows = []
    for c, name in enumerate(class_names):
        own = np.flatnonzero(labels[:, c] > 0.5)
        for j in range(k):
            m = c * k + j
            order = own[np.argsort(-scores[own, m], kind="stable")][:per_row]
            cells = []
            for t in order:
                heat = maps[t, m].astype(np.float32)
                lo, hi = float(heat.min()), float(heat.max())
                cells.append((fetch(int(t)), (heat - lo) / max(hi - lo, 1e-6)))
            best = f"max={scores[order[0], m]:.2f}" if len(order) else "no tiles"
            rows.append(AtlasRow([name, f"p={j + 1}", best], cells))
    return rows


def write_lpd_atlas(
    path: Path,
    model: LpdNet,
    cfg: LpdNetConfig,
    class_names: Sequence[str],
    tile_parquets: Sequence[Path],
    limit: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Scan up to ``limit`` labelled tiles, write the atlas PNG; returns what run.json records about it."""
    ids, images, labels = read_labelled_tiles(tile_parquets, limit)
    if not ids:
        return {"atlas": None, "atlas_tiles": 0}
    maps = prototype_maps(model, cfg, images, device)
    rows = atlas_rows(class_names, model.k, maps, labels, lambda t: decode_rgb(images[t], ids[t]))
    write_atlas(path, rows)
    return {"atlas": path.name, "atlas_tiles": len(ids)}
