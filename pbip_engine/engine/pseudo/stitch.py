"""Pseudo masks from CAMs stitched across overlapping tiles: one label per pixel, not one per tile.

Tiles overlap (a grid stride below the tile size; GlaS patches of 112 px every 56 px), so a pixel lies
under up to four tiles. Taking each tile's argmax on its own gives that pixel up to four labels, and stage
2 trains on all of them. OEEM instead averages the raw CAMs of overlapping patches into one whole-image
CAM and takes the argmax there; this module does that per slide (or per source image of a patch set):

1. each tile's CAM (``N,h,w`` in [0, 1]) is zeroed for the classes not in that tile's labels, resized to
   the canvas scale and added at the tile's level-0 position, with a per-pixel count;
2. each tile's area of the averaged canvas is cut out again and becomes its mask with ``cams_to_mask``
   (argmax over the tile's labels, or with ``intersect`` over the labels of every tile at the pixel, see
   below; then the ``none`` / ``white`` / ``power`` background rule).

Zeroing absent classes before averaging is what keeps a tile's labels meaningful: a neighbour labelled
with a class this tile lacks can lower this tile's scores there but never put that class in its mask.

Overlapping labels say more than each tile's own: a patch label is a statement about every pixel of the
patch, so a pixel can only hold a class that *every* tile over it lists. With ``intersect`` (the default
of ``pseudo.overlap_labels``) the argmax at a pixel runs over that intersection: a single-label patch
settles its whole area for its multi-label neighbours too, and every tile over a pixel gives it the same
label, so the stitched regions stage 2 trains on are consistent. On GlaS (112-px patches every 56 px)
29 % of the pixels are settled this way, all of them correctly, and the pseudo masks gain 0.02 mIoU
(BENCHMARKS.md). Where the tiles over a pixel share no class (contradictory labels) the tile's own labels
apply, as without the rule.

Some classes have holes the CAMs cannot see: a gland's lumen is textureless, so the CAMs fire on the
epithelium ring and leave the lumen to the surrounding class, while the truth (GlaS, and a pathologist's
outline) counts the lumen as gland. ``fill_holes`` gives such a class every region it fully encloses on
the slide's stitched mask, up to ``max_hole_px``, where that class is allowed. This needs the stitched
canvas: a lumen is rarely inside one tile.

Not every label is equally sure. Where two or more classes are allowed, the winner's lead over the
runner-up on the stitched CAM (its *margin*) says how sure the argmax was, and on GlaS it predicts the
label's accuracy well (lowest tenth of the margins 56 % right, highest 91 %; labels the tiles' labels or
the fill decide: 97 %). ``least_certain`` picks a slide's least sure pixels, so that the pseudo stage can
leave them out of what stage 2 learns from (``pseudo.ignore_uncertain``) while the masks keep them.

Memory: the canvas is float32 ``N x H x W`` at the tiles' pixel scale over the bounding box of one
slide's tiles (those passed in: the labelled ones), i.e. 4 classes on a 1536 x 1536 px demo slide at tile
scale are 38 MB, a GlaS image less. That is fine for the cohorts here; a whole-slide cohort with
slide-wide labelled regions (e.g. 40k x 40k px at tile scale) would need the chunked on-disk canvas of
``engine/inference/stitch.py`` instead.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from pbip_engine.engine.pseudo import MIN_WHITE_OBJECT_PX, WHITE_THRESHOLD
from pbip_engine.engine.pseudo.cams import UNCERTAIN, CamError, cams_to_mask

if TYPE_CHECKING:  # crf imports regions, which imports this module
    from pbip_engine.engine.pseudo.crf import CrfKernels

OVERLAP_LABELS = ("intersect", "own")


def encode_cam(cam: np.ndarray) -> bytes:
    """``N,h,w`` CAM -> compressed float16 ``.npy`` bytes, so tiles' CAMs can travel as a binary column."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(cam, dtype=np.float16), allow_pickle=False)
    return zlib.compress(buf.getvalue(), 3)


def decode_cam(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_cam`, as float32."""
    return np.load(io.BytesIO(zlib.decompress(data)), allow_pickle=False).astype(np.float32)


def encode_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    """Several arrays (e.g. a tile's feature maps per level) -> one compressed binary value."""
    buf = io.BytesIO()
    np.savez(buf, *arrays)
    return zlib.compress(buf.getvalue(), 3)


def decode_arrays(data: bytes) -> list[np.ndarray]:
    """Inverse of :func:`encode_arrays`, in order."""
    with np.load(io.BytesIO(zlib.decompress(data)), allow_pickle=False) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def masks_as_votes(masks: np.ndarray, n_classes: int) -> np.ndarray:
    """uint8 ``B,H,W`` masks -> one-hot float ``B,N,H,W`` (background = all zeros).

    For a CAM model that only makes masks: stitching its votes still gives one label per pixel (the
    majority of the overlapping tiles), and the background rules read zero votes as "no class here".
    """
    return np.eye(n_classes + 1, dtype=np.float32)[np.asarray(masks)][..., 1:].transpose(0, 3, 1, 2)


def resize_maps(cam: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``N,h,w`` -> ``N,H,W`` (``size``: ``(H, W)``, or one side for a square; bilinear; cv2 takes channels
    last and drops a single channel)."""
    h, w = (size, size) if isinstance(size, int) else size
    if cam.shape[1:] == (h, w):
        return cam
    out = cv2.resize(np.ascontiguousarray(cam.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, cam.shape[0]).transpose(2, 0, 1)


Layout = tuple[list[tuple[int, int, int]], int, int]


def tile_layout(xs: Sequence[int], ys: Sequence[int], sizes0: Sequence[int], sides: Sequence[int]) -> Layout:
    """Canvas position and extent ``(px, py, e)`` of each tile at the finest tile scale, and the canvas h, w."""
    scale = max(side / s for side, s in zip(sides, sizes0, strict=True))
    x0, y0 = min(xs), min(ys)
    pos = [(round((x - x0) * scale), round((y - y0) * scale), max(1, round(s * scale)))
           for x, y, s in zip(xs, ys, sizes0, strict=True)]  # fmt: skip
    return pos, max(py + e for _px, py, e in pos), max(px + e for px, _py, e in pos)


def paste_canvas(layout: Layout, tiles: Sequence[np.ndarray], fill: int, nearest: bool) -> np.ndarray:
    """The tiles (uint8 ``h,w`` or ``h,w,C``) pasted at their ``tile_layout`` positions on one canvas, ``fill``
    where no tile lies; resized to their canvas extent (nearest for labels, area for pixels). Where tiles
    overlap the later tile wins."""
    pos, h, w = layout
    first = np.asarray(tiles[0])
    canvas = np.full((h, w, *first.shape[2:]), fill, first.dtype)
    for (px, py, e), tile in zip(pos, tiles, strict=True):
        tile = np.asarray(tile)
        if tile.shape[0] != e or tile.shape[1] != e:
            tile = cv2.resize(tile, (e, e), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
        canvas[py : py + e, px : px + e] = tile
    return canvas


def listed_by_all(boxes: Sequence[tuple[int, int, int]], labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """bool ``N,h,w``: at each canvas pixel, the classes that every labelled square ``(x, y, side)`` over it
    lists (``labels``: multi-hot ``T,N``). A pixel no labelled square covers allows every class."""
    covered, listed = _label_counts(boxes, labels, h, w)
    return listed == covered[None]


def _label_counts(
    boxes: Sequence[tuple[int, int, int]], labels: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``h,w`` labelled squares over each canvas pixel, and int32 ``N,h,w`` how many of them list each
    class: every class they all list is ``listed == covered``, any class one of them lists ``listed > 0``."""
    labels = np.asarray(labels) > 0.5
    covered = np.zeros((h, w), np.int32)
    listed = np.zeros((labels.shape[1], h, w), np.int32)
    for (px, py, e), lab in zip(boxes, labels, strict=True):
        if lab.any():
            covered[py : py + e, px : px + e] += 1
            listed[:, py : py + e, px : px + e] += lab[:, None, None]
    return covered, listed


def shared_labels(
    xs: Sequence[int], ys: Sequence[int], sizes0: Sequence[int], sides: Sequence[int], labels: np.ndarray
) -> list[np.ndarray]:
    """Per tile, bool ``N,side,side``: the classes that every tile covering the pixel lists.

    Where the covering tiles share no class (contradictory labels) the tile's own labels are returned, so
    the result is never empty where the tile has a label. A tile with no label says nothing about its
    pixels and does not take part. ``sides``: each tile's mask/CAM side in px.
    """
    layout = tile_layout(xs, ys, sizes0, sides)
    return _shared_on(layout, sides, labels, _label_counts(layout[0], labels, *layout[1:]))


def _shared_on(
    layout: Layout, sides: Sequence[int], labels: np.ndarray, counts: tuple[np.ndarray, np.ndarray]
) -> list[np.ndarray]:
    """:func:`shared_labels` on a layout and its :func:`_label_counts` already computed."""
    labels = np.asarray(labels) > 0.5
    covered, listed = counts
    every = listed == covered[None]
    out = []
    for area, lab in zip(_cut_nearest(layout, every, sides), labels, strict=True):
        area = area & lab[:, None, None]
        out.append(np.where(area.any(0, keepdims=True), area, lab[:, None, None]))
    return out


def _cut_nearest(layout: Layout, canvas: np.ndarray, sides: Sequence[int]) -> list[np.ndarray]:
    """Each tile's area of a label canvas (``H,W`` or ``N,H,W``; uint8 or bool) at the tile's side.

    Nearest, unlike :func:`_cut`: a class value or an allowed-class flag of a coarser tile is the canvas
    pixel's own, never a blend of two.
    """
    out = []
    for (px, py, e), side in zip(layout[0], sides, strict=True):
        area = canvas[..., py : py + e, px : px + e]
        if e != side:
            flat = (
                area.astype(np.uint8)
                if area.ndim == 2
                else np.ascontiguousarray(area.transpose(1, 2, 0), np.uint8)
            )
            small = cv2.resize(flat, (side, side), interpolation=cv2.INTER_NEAREST).reshape(side, side, -1)
            area = (small[..., 0] if area.ndim == 2 else small.transpose(2, 0, 1)).astype(area.dtype)
        out.append(area)
    return out


def fill_enclosed(mask: np.ndarray, classes: Sequence[int], max_px: int | None = None) -> np.ndarray:
    """uint8 ``h,w`` mask with the holes of each class in ``classes`` given to that class.

    A hole of class k is a 4-connected region of other values that class k's pixels enclose, i.e. one
    that cannot reach the mask's border without crossing class k (``scipy.ndimage.binary_fill_holes``).
    Holes larger than ``max_px`` pixels are left alone (None: any size). Classes are filled in order, so
    a later class can take a hole an earlier one just filled only if it encloses it.
    """
    out = np.array(mask, dtype=np.uint8, copy=True)
    for k in classes:
        fg = out == k
        if not fg.any():
            continue
        holes = ndi.binary_fill_holes(fg) & ~fg
        if max_px is not None and holes.any():
            lab, n = ndi.label(holes)
            small = np.bincount(lab.ravel(), minlength=n + 1) <= max_px
            small[0] = False
            holes = small[lab]
        out[holes] = k
    return out


def _fill_tiles(
    masks: list[np.ndarray],
    layout: Layout,
    ok: Sequence[np.ndarray],
    classes: Sequence[int],
    max_px: int | None,
) -> list[np.ndarray]:
    """``fill_enclosed`` on the canvas the tiles' masks make together, written back to each tile where the
    filled class is allowed (``ok``: bool ``N,side,side`` per tile). Where masks of overlapping tiles
    disagree (contradictory labels) the tile pasted last draws the canvas."""
    canvas = paste_canvas(layout, masks, 0, nearest=True)
    filled = fill_enclosed(canvas, classes, max_px)
    if (filled == canvas).all():
        return masks
    out = []
    for f, m, allow in zip(_cut_nearest(layout, filled, [m.shape[0] for m in masks]), masks, ok, strict=True):
        cls = np.clip(f.astype(np.int64) - 1, 0, allow.shape[0] - 1)
        take = (f != m) & np.isin(f, classes) & np.take_along_axis(allow, cls[None], 0)[0]
        out.append(np.where(take, f, m).astype(np.uint8))
    return out


def stitch_cams(
    xs: Sequence[int],
    ys: Sequence[int],
    sizes0: Sequence[int],
    cams: Sequence[np.ndarray],
    labels: np.ndarray,
) -> list[np.ndarray]:
    """Each tile's area of the label-restricted average of all tiles' CAMs, at the tile's own ``N,h,w``.

    ``xs, ys, sizes0``: the tiles' level-0 positions and extents (one slide); ``cams``: ``N,h,w`` each;
    ``labels``: multi-hot ``T,N``. The canvas scale is the finest tile scale (``h / size0``).
    """
    if not len(cams):
        return []
    labels = _checked(xs, ys, sizes0, cams, labels)
    return _stitch_on(tile_layout(xs, ys, sizes0, [c.shape[1] for c in cams]), cams, labels)


def _checked(
    xs: Sequence[int],
    ys: Sequence[int],
    sizes0: Sequence[int],
    cams: Sequence[np.ndarray],
    labels: np.ndarray,
) -> np.ndarray:
    """``labels`` as float32 once the tiles' positions, CAMs and labels agree in count and class width."""
    t = len(cams)
    labels = np.asarray(labels, dtype=np.float32)
    if not (len(xs) == len(ys) == len(sizes0) == t == labels.shape[0]):
        raise CamError(
            f"stitch: {len(xs)} x, {len(ys)} y, {len(sizes0)} sizes, {t} CAMs, {len(labels)} labels"
        )
    n = cams[0].shape[0]
    if labels.shape[1] != n or any(c.ndim != 3 or c.shape[0] != n for c in cams):
        raise CamError(f"stitch: every CAM must be N,h,w with N = {labels.shape[1]} (the labels' width)")
    return labels


def _stitched_canvas(layout: Layout, cams: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """float32 ``N,H,W``: the label-restricted average of the tiles' CAMs on the slide's canvas."""
    pos, h, w = layout
    n = cams[0].shape[0]
    total = np.zeros((n, h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    for (px, py, e), cam, lab in zip(pos, cams, labels, strict=True):
        total[:, py : py + e, px : px + e] += (
            resize_maps(cam.astype(np.float32), e) * (lab > 0.5)[:, None, None]
        )
        count[py : py + e, px : px + e] += 1.0
    return total / np.maximum(count, 1.0)


def _cut(layout: Layout, canvas: np.ndarray, sides: Sequence[int]) -> list[np.ndarray]:
    """Each tile's area of a ``N,H,W`` float canvas, at the tile's side."""
    return [resize_maps(canvas[:, py : py + e, px : px + e], side)
            for (px, py, e), side in zip(layout[0], sides, strict=True)]  # fmt: skip


def _stitch_on(layout: Layout, cams: Sequence[np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    """:func:`stitch_cams` on a layout already computed (and inputs already checked)."""
    return _cut(layout, _stitched_canvas(layout, cams, labels), [c.shape[1] for c in cams])


def _crf_on_canvas(
    layout: Layout,
    canvas: np.ndarray,
    counts: tuple[np.ndarray, np.ndarray],
    rgbs: Sequence[np.ndarray],
    overlap_labels: str,
    kernels: CrfKernels | None,
    window: int,
    sides: Sequence[int],
) -> list[np.ndarray]:
    """``engine.pseudo.crf.canvas_crf`` on a slide's stitched CAM canvas; per tile its winner (uint8 class,
    1-based; 0 where no class is allowed), at the tile's side."""
    from pbip_engine.engine.pseudo.crf import CrfKernels, canvas_crf

    covered, listed = counts  # the tiles' _label_counts on this canvas
    union = listed > 0  # a class any covering tile lists
    allowed = union
    if overlap_labels == "intersect":  # where the covering tiles share no class, any of theirs (as per tile)
        every = (listed == covered[None]) & union
        allowed = np.where(every.any(0, keepdims=True), every, union)
    rgb = paste_canvas(layout, [np.asarray(r)[..., :3] for r in rgbs], 255, nearest=False)
    won = canvas_crf(canvas, allowed, rgb, kernels or CrfKernels(), window)
    return _cut_nearest(layout, (won + 1).astype(np.uint8), sides)  # 1-based; 0 where no class is allowed


def decision_margins(cams: Sequence[np.ndarray], allowed: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per tile, float32 ``h,w``: how far the winning class's score lies above the runner-up's, among the
    classes ``allowed`` (bool ``N,h,w``) at the pixel; ``inf`` where fewer than two are allowed (the labels
    alone decide there)."""
    out = []
    for cam, ok in zip(cams, allowed, strict=True):
        if cam.shape[0] < 2:
            out.append(np.full(cam.shape[1:], np.inf, np.float32))
            continue
        s = np.where(ok, cam, -np.inf)
        top2 = -np.partition(-s, 1, axis=0)[:2]
        with np.errstate(invalid="ignore"):  # -inf - -inf where nothing is allowed: not a margin
            m = (top2[0] - top2[1]).astype(np.float32)
        out.append(np.where(np.isfinite(m), m, np.float32(np.inf)))
    return out


def margin_quantile(margins: Sequence[np.ndarray], q: float) -> float | None:
    """The ``q`` quantile of a slide's finite margins (its CAM-decided pixels, all tiles together); None if
    it has none. A threshold per slide, not one number for every cohort: the margins' scale depends on the
    CAM read-out, their spread on the slide."""
    finite = [m[np.isfinite(m)] for m in margins]
    values = np.concatenate(finite) if finite else np.zeros(0, np.float32)
    return float(np.quantile(values, min(max(q, 0.0), 1.0))) if values.size else None


def least_certain(margins: Sequence[np.ndarray], fraction: float) -> list[np.ndarray]:
    """Per tile, bool ``h,w``: the ``fraction`` of a slide's CAM-decided pixels with the smallest margins."""
    cut = margin_quantile(margins, fraction) if fraction > 0 else None
    if cut is None:
        return [np.zeros(m.shape, bool) for m in margins]
    return [np.isfinite(m) & (m <= cut) for m in margins]


def stitched_masks(*args: Any, **options: Any) -> list[np.ndarray]:
    """uint8 ``h,w`` pseudo mask per tile: :func:`stitched_masks_and_margins` (same arguments) without the
    margins (which it does not compute)."""
    return stitched_masks_and_margins(*args, **options, margins=False)[0]


def stitched_masks_and_margins(
    xs: Sequence[int],
    ys: Sequence[int],
    sizes0: Sequence[int],
    cams: Sequence[np.ndarray],
    labels: np.ndarray,
    background: str = "none",
    rgbs: Sequence[np.ndarray] | None = None,
    *,
    white_threshold: int = WHITE_THRESHOLD,
    min_size: int = MIN_WHITE_OBJECT_PX,
    power: float = 10.0,
    crf: bool = False,
    crf_kernels: CrfKernels | None = None,
    crf_window: int = 1024,
    overlap_labels: str = "intersect",
    fill_holes: Sequence[int] = (),
    max_hole_px: int | None = None,
    margins: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 ``h,w`` pseudo mask per tile (0 = background, k = class k) from the stitched CAMs of one slide,
    and per tile the :func:`decision_margins` behind each label (``inf`` where the labels, a background
    rule or the hole fill decided rather than the CAMs' argmax; an empty list with ``margins=False``).

    ``rgbs`` (uint8 ``h,w,3`` per tile) is needed by the ``white`` rules and ``crf``, as in ``cams_to_mask``.
    ``overlap_labels``: ``intersect`` (a pixel takes only classes every tile over it lists) or ``own``.
    ``fill_holes``: class values (1-based) whose enclosed holes up to ``max_hole_px`` (at the tiles' pixel
    scale) take that class, on the slide's stitched mask (:func:`fill_enclosed`).
    ``crf``: a dense CRF (``crf_kernels``, px; ``engine.pseudo.crf.CrfKernels``) over the slide's stitched
    canvas, in windows of ``crf_window`` px, decides among the classes allowed at each pixel wherever the
    CAMs' argmax would (ties included); the background rules still apply on top. The margins stay the CAMs'
    leads: the CRF's own marginals are sure of the edges it smooths, and stage 2 taught on them instead lost
    testA 0.757 / 0.751 -> 0.749 / 0.715 on GlaS (BENCHMARKS.md, sessions 25-26).
    """
    if overlap_labels not in OVERLAP_LABELS:
        raise CamError(f"overlap_labels must be one of {OVERLAP_LABELS}, got {overlap_labels!r}")
    if ("white" in background or crf) and rgbs is None:
        raise CamError(f"background={background!r} needs the tiles' RGB images (rgbs=...)")
    if not len(cams):
        return [], []
    labels = _checked(xs, ys, sizes0, cams, labels)
    sides = [c.shape[1] for c in cams]
    layout = tile_layout(xs, ys, sizes0, sides)  # once: the CAMs, the overlap rule and the fill share it
    canvas = _stitched_canvas(layout, cams, labels)
    stitched = _cut(layout, canvas, sides)
    allowed: list[np.ndarray | None] = [None] * len(stitched)
    # once per slide: the overlap rule and the canvas CRF both read which classes the covering tiles list
    counts = _label_counts(layout[0], labels, *layout[1:])
    if overlap_labels == "intersect":
        allowed = list(_shared_on(layout, sides, labels, counts))
    out = []
    for i, (cam, ok) in enumerate(zip(stitched, allowed, strict=True)):
        rgb = None if rgbs is None else np.asarray(rgbs[i])[None]
        out.append(
            cams_to_mask(cam[None], labels[i : i + 1], background, rgb=rgb, allowed=None if ok is None else ok[None],
                         white_threshold=white_threshold, min_size=min_size, power=power)[0]
        )  # fmt: skip
    ok = [np.broadcast_to((lab > 0.5)[:, None, None], (len(lab), s, s)) if a is None else a
          for a, lab, s in zip(allowed, labels, sides, strict=True)]  # fmt: skip
    if crf:
        assert rgbs is not None
        wins = _crf_on_canvas(layout, canvas, counts, rgbs, overlap_labels, crf_kernels, crf_window, sides)
        for i, (w, a) in enumerate(zip(wins, ok, strict=True)):
            cls = np.clip(w.astype(np.int64) - 1, 0, a.shape[0] - 1)
            take = (out[i] != 0) & (w != 0) & np.take_along_axis(a, cls[None], 0)[0]
            out[i] = np.where(take, w, out[i]).astype(np.uint8)
    filled = _fill_tiles(out, layout, ok, fill_holes, max_hole_px) if fill_holes else out
    if not margins:
        return filled, []
    # the CAMs' argmax decided a pixel unless the fill, a background rule or a tie (UNCERTAIN) did
    decided = [(f == m) & (f != 0) & (f != UNCERTAIN) for f, m in zip(filled, out, strict=True)]
    lead = decision_margins(stitched, ok)  # the CAMs', with or without the CRF
    return filled, [np.where(d, g, np.float32(np.inf)) for d, g in zip(decided, lead, strict=True)]
