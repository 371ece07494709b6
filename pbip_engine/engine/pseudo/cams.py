"""From per-level CAMs to pseudo masks (0 = background, k = class k) and palettised PNGs.

Fusion follows the reference inference path: upsample each level bilinearly, ReLU, min-max each class map
of each image to [0, 1], weighted sum with weights normalised to sum 1 (so the fused map stays in [0, 1],
which the ``power`` background rule assumes). Restricting to the image-level classes and choosing the
background happen in ``cams_to_mask``. Background rules (each reference codebase has its own):

* ``none``   PBIP: argmax over the present classes only; background is never predicted (except on images
             with no positive label, which become all background).
* ``white``  WSSS-Tissue/TPRO white prior: grey > ``white_threshold`` with components smaller than
             ``min_size`` px removed (4-connectivity, like skimage's ``remove_small_objects``) -> 0.
             Defaults: ``engine.pseudo.WHITE_THRESHOLD`` / ``MIN_WHITE_OBJECT_PX`` (why: see there).
* ``power``  TPRO/LPD: a background score (1 - max_c M_c)^gamma competes in the argmax.
* ``white+power``  both (TPRO's LUAD setting).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pbip_engine.engine.io.atomic import atomic_save
from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.pseudo import MIN_WHITE_OBJECT_PX, WHITE_THRESHOLD

if TYPE_CHECKING:  # crf imports regions, which imports stitch, which imports this module
    from pbip_engine.engine.pseudo.crf import CrfKernels

BACKGROUNDS = ("none", "white", "power", "white+power")
UNCERTAIN = IGNORE_INDEX  # a pixel the CAMs cannot decide: stage 2's loss and the metrics skip it
UNCERTAIN_COLOR = (0, 0, 0)

DEFAULT_PALETTE: list[tuple[int, int, int]] = [
    (255, 255, 255),  # 0 background
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (153, 0, 255),
    (255, 165, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 128, 0),
]


class CamError(ValueError):
    """Bad CAM/mask inputs (shapes, options)."""


def fuse_cams(
    cams_per_level: Sequence[torch.Tensor],
    size: tuple[int, int],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """[B,N,h_i,w_i] per level -> [B,N,H,W] in [0, 1]: upsample, ReLU, per-map min-max, weighted mean.

    ``normalize=False`` skips the ReLU and the min-max: the raw fused CAM, which still orders the classes
    where the normalised maps are all clamped to 0 (``cams_to_mask``'s ``tie_break``).
    """
    if not cams_per_level:
        raise CamError("no CAM levels given")
    if weights is None:
        weights = [1.0] * len(cams_per_level)
    if len(weights) != len(cams_per_level) or sum(weights) <= 0 or min(weights) < 0:
        raise CamError(
            f"weights {list(weights)} must be >= 0, not all 0, one per level ({len(cams_per_level)})"
        )
    total = float(sum(weights))
    fused = None
    for w, cam in zip(weights, cams_per_level, strict=True):
        if w == 0:
            continue
        up = F.interpolate(cam.detach().float(), size=size, mode="bilinear", align_corners=False)
        if not normalize:
            fused = up * (w / total) if fused is None else fused + up * (w / total)
            continue
        up = up.clamp_min(0)
        flat = up.flatten(2)
        lo = flat.min(-1).values[..., None, None]
        hi = flat.max(-1).values[..., None, None]
        norm = (up - lo) / (hi - lo).clamp_min(1e-6)
        fused = norm * (w / total) if fused is None else fused + norm * (w / total)
    return fused  # type: ignore[return-value]


def white_mask(
    rgb: np.ndarray, threshold: int = WHITE_THRESHOLD, min_size: int = MIN_WHITE_OBJECT_PX
) -> np.ndarray:
    """Boolean [H,W] of white (grey > threshold) regions of at least ``min_size`` px of ``rgb`` (4-connected)."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise CamError(f"white prior needs an H,W,3 RGB image, got shape {rgb.shape}")
    grey = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    white = (grey > threshold).astype(np.uint8)
    if min_size <= 1 or not white.any():
        return white.astype(bool)
    _n, lab, stats, _ = cv2.connectedComponentsWithStats(white, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False
    return keep[lab]


def cams_to_mask(
    fused: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None,
    background: str = "none",
    rgb: np.ndarray | None = None,
    *,
    white_threshold: int = WHITE_THRESHOLD,
    min_size: int = MIN_WHITE_OBJECT_PX,
    power: float = 10.0,
    tie_break: torch.Tensor | np.ndarray | None = None,
    crf: bool = False,
    crf_kernels: CrfKernels | None = None,
    allowed: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """[B,N,H,W] fused CAMs (+ [B,N] image labels) -> uint8 [B,H,W]: 0 = background, k = class k, 255 = unsure.

    Absent classes (label 0) can never win. A tie between present classes (typically all clamped to 0
    where the CAMs carry no signal) must not go to whichever class comes first, or that class wins
    everywhere the model knows nothing: ``tie_break`` ([B,N,H,W], e.g. the raw fused CAM) decides it, and
    a tie left after that is ``UNCERTAIN`` (255), which stage 2 and the metrics ignore. The background
    rules still apply on top. ``rgb`` (uint8 [B,H,W,3]) is needed by the white rules and by ``crf``, which
    replaces the argmax over the present classes (and the ``power`` background) with a dense CRF's
    (``engine.pseudo.crf``, with ``crf_kernels``, px; default ``CrfKernels()``); ties then go to the CRF. ``allowed`` (bool [B,N,H,W]) narrows the present
    classes per pixel (``engine.pseudo.stitch.shared_labels``: the classes every overlapping tile lists);
    a class it rules out cannot win there: where the CRF chose one, the plain argmax stands (which may
    be ``UNCERTAIN`` on a tie).
    """
    if background not in BACKGROUNDS:
        raise CamError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    f = torch.as_tensor(fused).detach().float().cpu()
    if f.ndim != 4:
        raise CamError(f"fused CAMs must be [B,N,H,W], got shape {tuple(f.shape)}")
    b, n = f.shape[:2]
    present = (
        torch.ones(b, n, dtype=torch.bool) if labels is None else torch.as_tensor(labels).cpu().float() > 0.5
    )
    if present.shape != (b, n):
        raise CamError(f"labels must be [{b}, {n}], got shape {tuple(present.shape)}")
    here = present[:, :, None, None].expand_as(f)
    if allowed is not None:
        a = torch.as_tensor(allowed).cpu().bool()
        if a.shape != f.shape:
            raise CamError(f"allowed must have the CAMs' shape {tuple(f.shape)}, got {tuple(a.shape)}")
        here = here & a
    scores = f * here
    masked = scores.masked_fill(~here, -1.0)
    mask = masked.argmax(1) + 1
    tied = (masked == masked.amax(1, keepdim=True)) & here
    if tie_break is not None:
        t = torch.as_tensor(tie_break).detach().float().cpu()
        if t.shape != f.shape:
            raise CamError(f"tie_break must have the CAMs' shape {tuple(f.shape)}, got {tuple(t.shape)}")
        t = t.masked_fill(~tied, -torch.inf)
        mask = torch.where(tied.sum(1) > 1, t.argmax(1) + 1, mask)
        tied &= t == t.amax(1, keepdim=True)
    mask[tied.sum(1) > 1] = UNCERTAIN
    if "power" in background:
        bg = (1.0 - scores.amax(1)).clamp(0, 1) ** power
        mask = torch.where(bg > masked.amax(1), torch.zeros_like(mask), mask)
    mask[~present.any(1)] = 0
    out = mask.numpy().astype(np.uint8)
    if "white" in background or crf:
        if rgb is None:
            raise CamError(
                f"background={background!r}{' with crf' if crf else ''} needs the RGB images (rgb=...)"
            )
        rgb = np.asarray(rgb)
        if rgb.ndim == 3:
            rgb = rgb[None]
        if rgb.shape[:3] != out.shape:
            raise CamError(f"rgb shape {rgb.shape} does not match the masks {out.shape}")
    if crf:
        from pbip_engine.engine.pseudo.crf import CrfKernels, dense_crf

        kernels = crf_kernels or CrfKernels()  # px of these tiles

        for i in range(b):
            ids = torch.nonzero(present[i]).flatten()
            if ids.numel() == 0:
                continue
            # the tile's own classes: per-pixel zeros where ``allowed`` rules a class out would read as
            # "certainly not" and spread through the CRF's appearance kernel; the rule is applied after it
            own = f[i] * present[i][:, None, None]
            chans = [own[ids]]
            if "power" in background:
                chans.insert(0, ((1.0 - own.amax(0)).clamp(0, 1) ** power)[None])
            won = dense_crf(torch.cat(chans).numpy(), rgb[i], kernels)
            cls = (ids + 1).numpy()
            crf_mask = np.concatenate([[0], cls])[won] if "power" in background else cls[won]
            if allowed is not None:  # a ruled-out class the CRF chose gives way to the plain argmax
                ok = np.concatenate([np.ones((1, *crf_mask.shape), bool), here[i].numpy()])
                ruled_out = ~np.take_along_axis(ok, crf_mask[None].astype(np.int64), 0)[0]
                crf_mask = np.where(ruled_out, out[i], crf_mask)
            out[i] = crf_mask
    if "white" in background:
        for i in range(b):
            out[i][white_mask(rgb[i], white_threshold, min_size)] = 0
    return out


def palette_lut(colors: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8 [256, 3] colour of every mask value: ``colors[k]`` for k, ``UNCERTAIN_COLOR`` for 255, black else.

    Masks may carry ``UNCERTAIN`` whatever the class count, so every palette colours it.
    """
    lut = np.zeros((256, 3), np.uint8)
    for k, c in enumerate(list(colors)[:256]):
        lut[k] = [int(v) for v in c[:3]]
    if len(colors) <= UNCERTAIN:
        lut[UNCERTAIN] = UNCERTAIN_COLOR
    return lut


def write_palette_png(
    path: str | Path, mask: np.ndarray, colors: Sequence[Sequence[int]] | None = None
) -> Path:
    """Write a uint8 [H,W] index mask as a palettised PNG (index k -> colors[k]), atomically."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise CamError(f"{path}: mask must be 2-D, got shape {m.shape}")
    if m.dtype != np.uint8:
        if m.size and (m.min() < 0 or m.max() > 255):
            raise CamError(f"{path}: mask values must fit in uint8")
        m = m.astype(np.uint8)
    colors = list(colors) if colors is not None else DEFAULT_PALETTE
    if len(colors) > 256:
        raise CamError(f"{path}: a PNG palette holds at most 256 colours, got {len(colors)}")
    values = np.unique(m)
    stray = values[(values >= len(colors)) & (values != UNCERTAIN)]
    if stray.size:
        raise CamError(f"{path}: mask value {int(stray[-1])} has no colour (palette of {len(colors)})")
    m = np.ascontiguousarray(m)
    img = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
    img.putpalette(palette_lut(colors).ravel().tolist())
    p = Path(path)
    atomic_save(p, lambda tmp: img.save(tmp, format="PNG"))
    return p
