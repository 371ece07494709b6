"""``pseudo`` stage: ClassNet CAMs -> per-tile pseudo masks (palettised PNG + Parquet index) on an actor pool.

Masks are restricted to each tile's image-level classes; background follows ``pseudo.background``. With
``pseudo.stitch`` (default) the actors return CAMs, and the CAMs of overlapping tiles are averaged per slide
before the argmax (``engine/pseudo/stitch.py``), so a pixel under several tiles gets one label, not one
per tile. With ``pseudo.cam_context: regions`` the actors take a whole slide at a time and read its CAMs
on the picture its tiles make together (``engine/pseudo/region_cams.py``): every tile's CAM sees its
neighbours' tissue. Both stitching paths take a large slide in blocks of ``pseudo.block_px`` with a ring of
context tiles (``engine/pseudo/blocks.py``), so memory does not grow with the slide: the tile-CAM path groups
its rows by block (a context tile travels to each block that reads it), the whole-picture path reads a block's
rows from the slide's Parquet at a time.
Where ground truth exists (the synthetic cohort; patch datasets that ship masks, e.g. GlaS), the pseudo masks are scored against it, and a
per-slide mosaic of the masks is written for QA.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.engine.training.batches import decode_batch
from pbip_engine.jobs.manifest import write_json_atomic
from pbip_engine.jobs.resources import actor_pool_options, labelled_rows, read_options, write_parquet_fresh
from pbip_engine.jobs.rundir import REGIONS, mask_relpath, stage1_model, synth_truth_dir, tile_files
from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage

COLUMNS = ["tile_id", "slide_id", "x", "y", "size0", "image", "labels", "labelled"]


def _region_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("tile_id", pa.string()), ("slide_id", pa.string()), ("x", pa.int64()), ("y", pa.int64()),
                      ("width0", pa.int64()), ("height0", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
                      ("image", pa.binary()), ("mask", pa.binary())])  # fmt: skip


def _mask_rows(batch: dict[str, Any], masks: Any, out_dir: Path, colors: list) -> dict[str, Any]:
    """Write each tile's mask PNG; the samples/ rows (tile image + mask bytes) that stage 2 trains on."""
    from pbip_engine.engine.pseudo.cams import write_palette_png

    paths, pngs = [], []
    for sid, x, y, m in zip(batch["slide_id"], batch["x"], batch["y"], masks, strict=True):
        rel = mask_relpath(str(sid), int(x), int(y))
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_palette_png(out_dir / rel, m, colors)
        paths.append(rel)
        pngs.append((out_dir / rel).read_bytes())
    return {
        **{k: batch[k] for k in ("tile_id", "slide_id", "x", "y", "size0")},
        "mask_path": np.array(paths, dtype=object),
        "labels": batch["labels"],
        "image": batch["image"],  # the stage-2 training samples travel with their masks
        "mask": np.array(pngs, dtype=object),
    }


def _options(spec: Any) -> Any:
    from pbip_engine.methods import PseudoOptions

    p = spec.pseudo
    return PseudoOptions(p.background, p.white_threshold, p.min_object, p.gamma, p.flip, p.crf,
                         p.crf_options.kernels(spec.tiling.mpp) if p.crf else None)  # fmt: skip


def _any_labelled(path: Path) -> bool:
    """Whether a slide's tile Parquet has a labelled tile (its ``labelled`` column alone is read)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return bool(pc.any(pq.read_table(path, columns=["labelled"]).column("labelled")).as_py())


def _cam_model(spec: Any, model_path: str, bank_dir: str | None) -> Any:
    """The trained stage-1 model, on the actor's GPU if it has one."""
    import torch

    from pbip_engine.methods import Stage1Inputs, get_method

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return get_method(spec.method.name).load_cam_model(
        spec.method, Path(model_path), Stage1Inputs.from_spec(spec, bank_dir), device
    )


class PseudoPredictor:
    """Ray Data callable: one trained stage-1 model per actor.

    Per tile it writes the mask PNG and returns the samples rows, or with ``stitch`` returns the tile's CAMs
    (compressed float16) for :func:`stitch_block`, which needs every tile of a block (and its ring of context
    tiles) before any argmax: each tile's row comes once per block that reads it (``grids``: each slide's
    :class:`~pbip_engine.engine.pseudo.blocks.BlockGrid`), tagged for Ray Data to group by.
    """

    def __init__(
        self,
        spec: Any,
        model_path: str,
        bank_dir: str | None,
        out_dir: str,
        stitch: bool,
        grids: dict[str, Any] | None = None,
    ) -> None:
        self.model = _cam_model(spec, model_path, bank_dir)
        self.options = _options(spec)
        self.out_dir = Path(out_dir)
        self.colors = [(255, 255, 255), *spec.class_colors]
        self.stitch = stitch
        self.grids = grids or {}
        self.features = stitch and spec.pseudo.image_prototypes > 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pbip_engine.engine.pseudo.stitch import encode_arrays, encode_cam, masks_as_votes

        decoded = decode_batch(batch)
        if not self.stitch:
            return _mask_rows(
                batch, self.model.predict_masks(decoded, self.options), self.out_dir, self.colors
            )
        extra: dict[str, Any] = {}
        if self.features:  # pseudo.image_prototypes: each tile's features per level + the level weights last
            cams, feats, weights = self.model.predict_cams_and_features(decoded, self.options)
            w = np.asarray(weights, np.float32)
            blobs = [encode_arrays([f[i] for f in feats] + [w]) for i in range(len(cams))]
            extra["features"] = np.array(blobs, dtype=object)
        elif hasattr(self.model, "predict_cams"):
            cams = self.model.predict_cams(decoded, self.options)
        else:  # a method without CAMs to share: its per-tile masks vote in the overlaps
            masks = self.model.predict_masks(decoded, self.options)
            cams = masks_as_votes(masks, decoded["labels"].shape[1])
        keep = ("tile_id", "slide_id", "x", "y", "size0", "labels", "image")
        cam = np.array([encode_cam(c) for c in cams], dtype=object)
        return tag_blocks({**{k: batch[k] for k in keep}, "cam": cam, **extra}, self.grids)


def stitch_slide(batch: dict[str, Any], spec: Any, out_dir: str) -> dict[str, Any]:
    """One slide's tile CAMs -> stitched masks -> the samples rows, in process (the Ray path groups by block
    instead: :func:`stitch_block`); a slide larger than ``pseudo.block_px`` is stitched block by block."""
    return _by_blocks(batch, spec, out_dir, lambda sub: _stitch_cams(sub, spec))


def stitch_block(batch: dict[str, Any], spec: Any, out_dir: str, grids: dict[str, Any]) -> dict[str, Any]:
    """Ray Data ``map_groups`` function: one block's tile CAMs (the rows :class:`PseudoPredictor` tagged with
    the block, its context tiles with ``keep`` false) -> stitched masks -> the kept tiles' samples rows."""
    sid, k = str(batch["block"][0]).rsplit("/", 1)
    rows = {c: v for c, v in batch.items() if c not in ("block", "keep")}
    name = grids[sid].name(sid, int(k))
    return _write_block(rows, np.asarray(batch["keep"], bool), *_stitch_cams(rows, spec), spec, out_dir, name)


def _stitch_cams(sub: dict[str, Any], spec: Any) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
    """A block's rows with their encoded CAMs (and features) -> images, masks and stage-2 training masks."""
    from pbip_engine.engine.pseudo.stitch import decode_arrays, decode_cam

    cams = [decode_cam(c) for c in sub["cam"]]
    feats, weights = None, []
    if spec.pseudo.image_prototypes:  # each tile's features per level, the level weights last
        blobs = [decode_arrays(b) for b in sub["features"]]
        feats, weights = [b[:-1] for b in blobs], blobs[0][-1].tolist()
    rgbs = decode_batch(sub)["image"]
    return (rgbs, *_stitched_masks(sub, rgbs, cams, feats, weights, spec))


class RegionPseudo:
    """Ray Data callable (``pseudo.cam_context: regions``), one trained stage-1 model per actor, fed the paths
    of the tile stage's per-slide Parquet files (no shuffle): per slide, the CAMs are read on the picture its
    labelled tiles make together (``engine/pseudo/region_cams.py``), cut back into the tiles, and stitched
    into masks as in :func:`stitch_slide`. A slide larger than ``pseudo.block_px`` is read from its Parquet
    one block (with its context tiles) at a time, so neither its tiles nor its canvases are held whole."""

    def __init__(self, spec: Any, model_path: str, bank_dir: str | None, out_dir: str) -> None:
        self.model = _cam_model(spec, model_path, bank_dir)
        self.options = _options(spec)
        self.spec, self.out_dir = spec, out_dir

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _concat([part for path in batch["path"] for part in self.slide_file(Path(str(path)))])

    def slide_file(self, path: Path) -> list[dict[str, Any]]:
        """One slide's tile Parquet -> its samples rows, a block's rows read at a time (a filter on the
        block's window; :func:`_blocks_of` then takes the exact members)."""
        import pyarrow.parquet as pq

        grid, sid, reach = slide_grid(path, self.spec)

        def rows_of(k: int) -> dict[str, Any]:
            filters = [("labelled", "==", True), *_window_filter(grid, k, reach)]
            table = pq.read_table(str(path), columns=COLUMNS, filters=filters)
            return {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}

        return _blocks_of(grid, sid, rows_of, self.spec, self.out_dir, self.block)

    def slide(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One slide's labelled tile rows, all in memory -> its masks and samples rows (block by block)."""
        return _by_blocks(batch, self.spec, self.out_dir, self.block)

    def block(self, batch: dict[str, Any]) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
        """A block's tile rows -> their images, masks and stage-2 training masks, its CAMs read as one picture."""
        from pbip_engine.engine.pseudo.region_cams import region_tile_cams
        from pbip_engine.engine.pseudo.stitch import tile_layout

        rgbs = decode_batch(batch)["image"]
        layout = tile_layout([int(v) for v in batch["x"]], [int(v) for v in batch["y"]],
                             [int(v) for v in batch["size0"]], [r.shape[0] for r in rgbs])  # fmt: skip
        tile_px = int(np.median([e for _x, _y, e in layout[0]]))  # a tile's extent on the canvas
        features = bool(self.spec.pseudo.image_prototypes)
        weights: list[float] = []

        def read(image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
            nonlocal weights
            cams, feats, weights = self.model.predict_region(image, tile_px, self.options, features)
            return cams, feats

        cap = self.model.max_region_px(tile_px)
        cams, feats = region_tile_cams(layout, rgbs, read, self.spec.pseudo.region_px, tile_px, cap)
        return (rgbs, *_stitched_masks(batch, rgbs, cams, feats if features else None, weights, self.spec))


def slide_grid(path: Path, spec: Any) -> tuple[Any, str, int]:
    """A slide's block grid (``engine/pseudo/blocks.py``), id and largest tile (level-0 px), from its labelled
    tiles' squares in its tile Parquet (only the position columns are read), blocks sized at the tiles'
    stored edge."""
    import pyarrow.parquet as pq

    from pbip_engine.engine.pseudo.blocks import BlockGrid

    cols = ["slide_id", "x", "y", "size0", "tile_px"]
    t = pq.read_table(str(path), columns=cols, filters=[("labelled", "==", True)])
    v = {c: t.column(c).to_numpy(zero_copy_only=False) for c in cols}
    sid = str(v["slide_id"][0]) if t.num_rows else path.stem
    edge = int(np.median(v["tile_px"])) if t.num_rows else spec.tiling.tile_px
    reach = int(v["size0"].max()) if t.num_rows else 0
    return BlockGrid.of(v["x"], v["y"], v["size0"], edge, spec.pseudo.block_px), sid, reach


def _window_filter(grid: Any, k: int, reach: int) -> list[tuple[str, str, int]]:
    """A Parquet row filter holding every tile that reaches into block ``k``'s window (a superset: ``reach``,
    the largest tile, bounds how far left of the window a tile may start)."""
    import math

    left, top, right, bottom = grid.window(k)
    if not math.isfinite(left):
        return []
    return [("x", "<", math.ceil(right)), ("x", ">", math.floor(left) - reach),
            ("y", "<", math.ceil(bottom)), ("y", ">", math.floor(top) - reach)]  # fmt: skip


def tag_blocks(rows: dict[str, Any], grids: dict[str, Any]) -> dict[str, Any]:
    """Tiles' rows -> one row per (tile, block that reads it), with the block's key (``<slide>/<k>``, what
    Ray Data groups by) and whether the block keeps the tile; a context tile so travels to two or more
    blocks, and no group holds more than a block and its ring."""
    sids = np.asarray([str(v) for v in rows["slide_id"]])
    order, keys, keep = [], [], []
    for sid in dict.fromkeys(sids.tolist()):
        at = np.flatnonzero(sids == sid)
        grid = grids[sid]
        x, y, s = (np.asarray(rows[c])[at] for c in ("x", "y", "size0"))
        for k in range(len(grid)):
            reads, keeps = grid.select(k, x, y, s)
            if reads.any():
                order.append(at[reads])
                keys += [f"{sid}/{k}"] * int(reads.sum())
                keep.append(keeps[reads])
    idx = np.concatenate(order)
    return {**{c: _column(v)[idx] for c, v in rows.items()}, "block": np.array(keys, dtype=object),
            "keep": np.concatenate(keep)}  # fmt: skip


def _column(values: Any) -> np.ndarray:
    """A batch column as a numpy array to index rows by (a list of bytes stays objects: numpy's fixed-width
    bytes would drop an encoded image's trailing zero bytes)."""
    if isinstance(values, np.ndarray):
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _by_blocks(
    batch: dict[str, Any],
    spec: Any,
    out_dir: str,
    block: Callable[[dict[str, Any]], tuple[Any, list[np.ndarray], list[np.ndarray]]],
) -> dict[str, Any]:
    """One slide's tile rows, all in memory, split into blocks of at most ``pseudo.block_px``
    (``engine/pseudo/blocks.py``; at the rows' ``tile_px`` where they carry it, else ``tiling.tile_px``):
    ``block`` makes each block's images, masks and training masks, and :func:`_write_block` writes its kept
    tiles. Returns the samples rows of every tile, in the order of ``batch``'s rows within each block."""
    from pbip_engine.engine.pseudo.blocks import BlockGrid

    sid = str(batch["slide_id"][0])
    edge = int(np.median(batch["tile_px"])) if "tile_px" in batch else spec.tiling.tile_px
    grid = BlockGrid.of(batch["x"], batch["y"], batch["size0"], edge, spec.pseudo.block_px)
    return _concat(_blocks_of(grid, sid, lambda _k: batch, spec, out_dir, block))


def _blocks_of(
    grid: Any,
    sid: str,
    rows_of: Callable[[int], dict[str, Any]],
    spec: Any,
    out_dir: str,
    block: Callable[[dict[str, Any]], tuple[Any, list[np.ndarray], list[np.ndarray]]],
) -> list[dict[str, Any]]:
    """Per block of ``grid``: the rows ``rows_of(k)`` gives (the whole slide, or a superset read for the
    block), cut to the block's members; ``block`` makes their images, masks and training masks, and
    :func:`_write_block` writes the kept tiles. Returns each block's samples rows."""
    parts = []
    for k in range(len(grid)):
        rows = rows_of(k)
        reads, keeps = grid.select(k, rows["x"], rows["y"], rows["size0"])
        members = np.flatnonzero(reads)
        sub = {c: _column(v)[members] for c, v in rows.items()}
        parts.append(_write_block(sub, keeps[members], *block(sub), spec, out_dir, grid.name(sid, k)))
    return parts


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def _write_block(
    sub: dict[str, Any],
    keep: np.ndarray,
    rgbs: Any,
    masks: Any,
    train: Any,
    spec: Any,
    out_dir: str,
    name: str,
) -> dict[str, Any]:
    """A block's kept tiles: their stitched regions (``regions/<name>.parquet``), mask PNGs and samples rows."""
    idx = np.flatnonzero(keep)
    kept = {c: _column(v)[idx] for c, v in sub.items()}
    write_regions(kept, [rgbs[i] for i in idx], [train[i] for i in idx], spec.pseudo.region_px,
                  Path(out_dir) / REGIONS, name)  # fmt: skip
    colors = [(255, 255, 255), *spec.class_colors]
    return _mask_rows(kept, [masks[i] for i in idx], Path(out_dir), colors)


def _stitched_masks(
    batch: dict[str, Any],
    rgbs: Any,
    cams: list[np.ndarray],
    feats: list[list[np.ndarray]] | None,
    weights: list[float],
    spec: Any,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One slide's (or block's) tile CAMs (and with ``pseudo.image_prototypes`` their features per level) ->
    stitched masks, and the masks stage 2 learns from (the least certain pixels left out)."""
    from pbip_engine.engine.pseudo.regions import IGNORE
    from pbip_engine.engine.pseudo.stitch import least_certain, stitched_masks_and_margins

    o = _options(spec)
    p = spec.pseudo
    tiles = ([int(v) for v in batch["x"]], [int(v) for v in batch["y"]], [int(v) for v in batch["size0"]])
    labels = np.stack([np.asarray(v, np.float32) for v in batch["labels"]])
    rules = dict(white_threshold=o.white_threshold, min_size=o.min_object, power=o.gamma,
                 overlap_labels=p.overlap_labels)  # fmt: skip
    if p.image_prototypes and feats is not None:  # the slide's own prototypes, from its surest first labels
        from pbip_engine.engine.pseudo.image_prototypes import image_prototype_cams

        first, lead = stitched_masks_and_margins(*tiles, cams, labels, o.background, rgbs, **rules)  # no CRF
        cams, _ = image_prototype_cams(cams, feats, weights, first, lead, labels, p.image_prototypes,
                                       p.image_prototype_weight, p.image_prototype_k)  # fmt: skip
    masks, margins = stitched_masks_and_margins(
        *tiles, cams, labels, o.background, rgbs, **rules, crf=o.crf, crf_kernels=o.crf_kernels,
        crf_window=p.region_px,
        fill_holes=[spec.class_names.index(c) + 1 for c in p.fill_holes],
        max_hole_px=p.max_hole_px, margins=bool(p.ignore_uncertain),
    )  # fmt: skip
    train = masks  # what stage 2 learns from: the least certain pixels can be left out of it
    if p.ignore_uncertain:
        doubt = least_certain(margins, p.ignore_uncertain)
        train = [np.where(d, np.uint8(IGNORE), m) for m, d in zip(masks, doubt, strict=True)]
    return masks, train


def write_regions(
    batch: dict[str, Any], rgbs: Any, masks: Any, region_px: int, folder: Path, name: str | None = None
) -> int:
    """One slide's (or block's) stitched regions (``engine/pseudo/regions.py``) as ``<folder>/<name>.parquet``
    (``name``: the slide id by default), for stage 2's crops (``segmenter.crop_px``); written to a temp name
    and renamed. Returns the region count."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pbip_engine.engine.io.atomic import atomic_path
    from pbip_engine.engine.pseudo.regions import stitched_regions

    sid = str(batch["slide_id"][0])
    regions = stitched_regions([int(v) for v in batch["x"]], [int(v) for v in batch["y"]],
                               [int(v) for v in batch["size0"]], rgbs, masks, region_px)  # fmt: skip
    rows = []
    for i, r in enumerate(regions):
        ok_i, img = cv2.imencode(".png", cv2.cvtColor(r.image, cv2.COLOR_RGB2BGR))
        ok_m, msk = cv2.imencode(".png", r.mask)
        if not (ok_i and ok_m):
            raise RuntimeError(f"slide {sid}: could not encode region {i} as PNG")
        rows.append({"tile_id": f"{sid}/r{r.x}_{r.y}", "slide_id": sid, "x": r.x, "y": r.y,
                     "width0": r.width0, "height0": r.height0, "width": r.image.shape[1], "height": r.image.shape[0],
                     "image": img.tobytes(), "mask": msk.tobytes()})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name or sid}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=_region_schema()), tmp)
    return len(rows)


@register_stage
class PseudoStage(Stage):
    name = "pseudo"
    # v2: samples/ Parquet (image + mask); v3: scored against patch masks; v4: method plug-ins;
    # v5: CAMs stitched across overlapping tiles (pseudo.stitch), flip TTA (pseudo.flip);
    # v6: stitched regions/ for stage 2's crops (pseudo.region_px); v7: regions carry their px size;
    # v8: a pixel under overlapping tiles takes only the classes they all list (pseudo.overlap_labels);
    # v9: holes a class encloses on the stitched mask can take that class (pseudo.fill_holes);
    # v10: the least certain pixels can be left unlabelled in the regions (pseudo.ignore_uncertain);
    # v11: CAMs re-read against each slide's own prototypes (pseudo.image_prototypes);
    # v12: CAMs read on each slide's stitched tiles as one picture (pseudo.cam_context: regions);
    # v13: with stitch the dense CRF runs on each slide's canvas (pseudo.crf, crf_options in µm)
    # v14: with the CRF, ignore_uncertain still ranks the CAMs' margins, not the CRF marginals' leads
    # v15: a slide's classes can have several prototypes each (pseudo.image_prototype_k)
    version = 15
    deps = ("tile", "bank", "classnet")
    sections = ("classes", "method", "pseudo")

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow as pa
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq
        import ray

        from pbip_engine.engine.pseudo.mosaics import slide_mosaics
        from pbip_engine.engine.pseudo.scoring import patch_truth, score_pseudo, synth_truth
        from pbip_engine.schemas.datasets import PSEUDO_INDEX

        spec = ctx.spec
        ctx.ray()
        files = tile_files(ctx.stage_dir("tile"))
        model = {
            "spec": spec,
            "model_path": str(stage1_model(ctx)),
            "bank_dir": str(ctx.stage_dir("bank")) if "bank" in self.dependencies(spec) else None,
            "out_dir": str(ctx.work_dir),
        }
        if spec.pseudo.stitch:
            import shutil

            shutil.rmtree(ctx.work_dir / REGIONS, ignore_errors=True)  # a re-run's slides may differ
        if spec.pseudo.stitch and spec.pseudo.cam_context == "regions":
            # a slide's tiles are read as one picture: each actor call takes one slide's Parquet (no shuffle)
            slides = [{"path": str(f)} for f in files if _any_labelled(f)]
            ds = ray.data.from_items(slides, override_num_blocks=max(1, len(slides)))
            ds = ds.map_batches(RegionPseudo, fn_constructor_kwargs=model, batch_size=1, batch_format="numpy",
                                **actor_pool_options(spec.resources))  # fmt: skip
        else:
            grids = {}
            if spec.pseudo.stitch:  # each slide's blocks, from its tiles' positions alone (a small object)
                for f in files:
                    grid, sid, _ = slide_grid(f, spec)
                    if len(grid):  # a slide without labelled tiles has no blocks
                        grids[sid] = grid
            ds = ray.data.read_parquet([str(f) for f in files], columns=COLUMNS, **read_options())
            ds = labelled_rows(ds)  # pushed into the read
            ds = ds.map_batches(
                PseudoPredictor,
                fn_constructor_kwargs={**model, "stitch": spec.pseudo.stitch, "grids": grids},
                batch_size=32,
                batch_format="numpy",
                **actor_pool_options(spec.resources),
            )
            if spec.pseudo.stitch:  # every tile of a block in one call: overlaps need all their tiles' CAMs
                ds = ds.groupby("block").map_groups(
                    stitch_block, fn_kwargs={"spec": spec, "out_dir": str(ctx.work_dir), "grids": grids},
                    batch_format="numpy",
                )  # fmt: skip
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
