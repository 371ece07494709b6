"""CAMs read on a slide's stitched regions rather than tile by tile (``pseudo.cam_context: regions``).

A tile's CAM sees only the tile: on GlaS a 56-px patch (112 native px) is a fraction of a gland, so the
network must guess from a ring of epithelium or a patch of lumen. Stitching the CAMs of overlapping
tiles (``stitch.py``) averages these guesses but adds no context. Reading the whole stitched picture in one
pass lets every feature cell see its neighbours up to the network's receptive field, as OEEM and the gland
paper do at test time on whole images. Measured on GlaS (BENCHMARKS.md, session 24): pseudo masks 0.709 ->
0.733 and testA 0.729 -> 0.757 for one ClassNet, similar on two more seeds. Most of it comes through
``pseudo.image_prototypes``, whose features then see the whole image: without it the masks are 0.687 (tiles) and 0.689 (whole image).

The network must see the tissue at the scale it learnt: a tile of ``tile_px`` entered it at ``input_px``,
so the canvas enters it scaled by ``input_px / tile_px`` (:func:`region_input`, which every CAM model's
``predict_region`` starts from). A large canvas is read in windows of ``window_px`` canvas pixels, each with
``margin_px`` of context on every side that is read but not kept, so memory stays bounded and no window edge
cuts a tile's context short. A model whose memory grows faster than its input (gland's position attention:
with the square of its cells) states the largest picture it reads (``max_region_px``), and the windows shrink
to fit it: one level of windows, here, rather than windows the model cuts again inside each of ours.

The canvas CAMs (and features, for ``pseudo.image_prototypes``) are then cut back into each tile's area, so
every rule that follows (the tiles' labels, the background rule, the hole fill, the margins) is the
tile-stitching path's, unchanged.

Memory: the canvas image (uint8) and its CAMs (float32, one map per class) span the bounding box of the tiles
they are given, as the stitching canvas of ``stitch.py`` does; the features are at their levels' strides. The
pseudo stage hands them one block of a slide at a time (``blocks.py``, ``pseudo.block_px``), so a slide labelled
throughout does not need its whole section on one canvas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pbip_engine.engine.pseudo.regions import cuts
from pbip_engine.engine.pseudo.stitch import Layout, paste_canvas, resize_maps
from pbip_engine.engine.training.inputs import to_model_input

# One window's read: uint8 ``h,w,3`` -> (``N,h,w`` CAMs, per level ``C,h_l,w_l`` features; empty without them)
RegionReader = Callable[[np.ndarray], tuple[np.ndarray, list[np.ndarray]]]


def region_input(
    image: np.ndarray,
    tile_px: int,
    input_px: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
) -> torch.Tensor:
    """A uint8 ``H,W,3`` picture as the normalised ``1,3,h,w`` network input, scaled as its tiles of
    ``tile_px`` entered the network (to ``input_px``; None: as they are)."""
    x = to_model_input({"image": np.asarray(image, np.uint8)[None]}, mean, std, device)["image"]
    s = (input_px or tile_px) / tile_px
    h, w = x.shape[-2:]
    net = (max(1, round(h * s)), max(1, round(w * s)))
    if net != (h, w):
        x = F.interpolate(x, size=net, mode="bilinear", align_corners=False, antialias=s < 1)
    return x


def _resize_features(f: np.ndarray, h: int, w: int) -> np.ndarray:
    """``C,h',w'`` -> ``C,h,w`` bilinear (torch: any channel count, where cv2 stops at 512)."""
    if f.shape[1:] == (h, w):
        return f
    t = torch.from_numpy(np.ascontiguousarray(f, np.float32))[None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()


def read_canvas(
    image: np.ndarray,
    read: RegionReader,
    window_px: int,
    margin_px: int,
    covered: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``N,H,W`` CAMs and per level unit ``C,h_l,w_l`` features of a uint8 ``H,W,3`` canvas, read window by
    window (at most ``window_px`` a side, each with ``margin_px`` of context read around it and dropped).

    ``covered`` (bool ``H,W``): windows with no covered pixel are skipped (their CAMs stay 0, their
    features 0). A level's feature canvas is ``H,W`` times that level's cells per pixel in the first window.
    """
    if window_px < 16 or margin_px < 0:
        raise ValueError(
            f"read_canvas: window_px must be >= 16 and margin_px >= 0, got {window_px}, {margin_px}"
        )
    h, w = image.shape[:2]
    cams: np.ndarray | None = None
    feats: list[np.ndarray] = []
    ratios: list[float] = []
    for ya, yb in cuts(h, window_px):
        for xa, xb in cuts(w, window_px):
            if covered is not None and not covered[ya:yb, xa:xb].any():
                continue
            ta, tb = max(0, ya - margin_px), min(h, yb + margin_px)
            la, lb = max(0, xa - margin_px), min(w, xb + margin_px)
            c, f = read(np.ascontiguousarray(image[ta:tb, la:lb]))
            if cams is None:
                cams = np.zeros((c.shape[0], h, w), np.float32)
                ratios = [fl.shape[1] / (tb - ta) for fl in f]
                feats = [np.zeros((fl.shape[0], max(1, round(h * r)), max(1, round(w * r))), np.float32)
                         for fl, r in zip(f, ratios, strict=True)]  # fmt: skip
            cams[:, ya:yb, xa:xb] = c[:, ya - ta : yb - ta, xa - la : xb - la]
            for canvas, fl, r in zip(feats, f, ratios, strict=True):
                ry, rx = fl.shape[1] / (tb - ta), fl.shape[2] / (lb - la)  # this window's own cells per px
                dy0, dy1 = round(ya * r), max(round(ya * r) + 1, round(yb * r))
                dx0, dx1 = round(xa * r), max(round(xa * r) + 1, round(xb * r))
                dy1, dx1 = min(dy1, canvas.shape[1]), min(dx1, canvas.shape[2])
                sy0, sx0 = round((ya - ta) * ry), round((xa - la) * rx)
                sy1 = max(sy0 + 1, round((yb - ta) * ry))
                sx1 = max(sx0 + 1, round((xb - la) * rx))
                part = fl[:, sy0:sy1, sx0:sx1].astype(np.float32)
                canvas[:, dy0:dy1, dx0:dx1] = _resize_features(part, dy1 - dy0, dx1 - dx0)
    if cams is None:
        return np.zeros((0, h, w), np.float32), []
    for canvas in feats:  # resizing and window seams leave vectors off the unit sphere
        canvas /= np.maximum(np.linalg.norm(canvas, axis=0, keepdims=True), 1e-12)
    return cams, feats


def tile_maps(
    cams: np.ndarray, feats: Sequence[np.ndarray], layout: Layout, sides: Sequence[int]
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Each tile's area of canvas ``cams`` (at the tile's ``side``) and of each level's ``feats`` (at that
    level's cells, rounded to whole cells); ``layout`` is the canvas's ``stitch.tile_layout``."""
    pos, h, w = layout
    out_c, out_f = [], []
    for (px, py, e), side in zip(pos, sides, strict=True):
        out_c.append(resize_maps(cams[:, py : py + e, px : px + e], side))
        per_level = []
        for f in feats:
            ry, rx = f.shape[1] / h, f.shape[2] / w
            y0, x0 = min(round(py * ry), f.shape[1] - 1), min(round(px * rx), f.shape[2] - 1)
            y1, x1 = max(y0 + 1, round((py + e) * ry)), max(x0 + 1, round((px + e) * rx))
            per_level.append(np.ascontiguousarray(f[:, y0:y1, x0:x1]))
        out_f.append(per_level)
    return out_c, out_f


def region_tile_cams(
    layout: Layout,
    images: Sequence[np.ndarray],
    read: RegionReader,
    window_px: int,
    margin_px: int,
    max_read_px: int | None = None,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Per tile, its ``N,side,side`` CAMs and per-level features, read on the canvas the tiles make
    together (uint8 ``side,side,3`` ``images`` pasted by ``layout``) rather than on each tile alone.

    ``max_read_px``: the largest edge ``read`` takes (its margins included); the windows and their margin
    shrink to fit it (a margin of at most a quarter of it)."""
    if max_read_px is not None:
        margin_px = min(margin_px, max_read_px // 4)
        window_px = max(16, min(window_px, max_read_px - 2 * margin_px))
    canvas = paste_canvas(layout, [np.asarray(i, np.uint8) for i in images], 255, nearest=False)
    pos, h, w = layout
    covered = np.zeros((h, w), bool)
    for px, py, e in pos:
        covered[py : py + e, px : px + e] = True
    cams, feats = read_canvas(canvas, read, window_px, margin_px, covered)
    return tile_maps(cams, feats, layout, [np.asarray(i).shape[0] for i in images])
