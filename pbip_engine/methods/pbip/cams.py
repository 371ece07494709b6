"""PBIP's CAMs as pseudo masks: fuse the levels' cosine CAMs, restrict to the image labels, apply the background rule."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.metrics import SegmentationMeter
from pbip_engine.engine.pseudo.cams import cams_to_mask, fuse_cams
from pbip_engine.engine.training.amp import autocast
from pbip_engine.engine.training.checkpoint import load_weights, read_checkpoint
from pbip_engine.engine.training.inputs import rgb_uint8, to_model_input
from pbip_engine.methods.base import MasksFromCams, PseudoOptions
from pbip_engine.methods.pbip.classnet import (
    ClassNetConfig,
    build_classnet,
    load_prototypes_from_bank,
    resize_input,
)
from pbip_engine.methods.pbip.task import KIND


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# Weight of the raw CAM folded into the normalised one: it only decides between classes whose
# normalised CAMs are (nearly) equal, e.g. both 0 where min-max normalisation flattened them.
TIE_EPS = 1e-3


def _fused(model: nn.Module, image: torch.Tensor, cfg: ClassNetConfig, device: torch.device | str):
    """(min-max normalised fused CAMs, raw fused CAMs, per-level logits)."""
    with autocast(device, cfg.amp):
        out = model(resize_input(image, getattr(cfg, "input_px", None)))
    size = tuple(image.shape[-2:])  # CAMs at the tile's own size
    fused = fuse_cams(out["cams"], size, cfg.eval_fuse_weights)
    raw = fuse_cams(out["cams"], size, cfg.eval_fuse_weights, normalize=False)
    return fused, raw, out["logits"]


def _with_tie_break(fused: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Fused CAMs in [0, 1] whose exact ties are ordered by the raw CAM (moves values by at most TIE_EPS).

    Stitching averages tile CAMs before the argmax and has no raw CAM to break ties with, so the
    order is carried inside the values themselves.
    """
    return fused * (1 - TIE_EPS) + TIE_EPS * torch.sigmoid(raw.float())


@torch.inference_mode()
def predict_cams(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: ClassNetConfig,
    device: torch.device | str,
    *,
    flip: bool = False,
) -> torch.Tensor:
    """Fused CAMs ``B,N,H,W`` in [0, 1], no label restriction; ``flip`` averages in the mirrored image's CAMs.

    Kept apart from the argmax so that the pseudo stage can average overlapping tiles' CAMs first.
    """
    return predict_cams_and_features(model, batch, cfg, device, flip=flip, features=False)[0]


def cam_level_features(out: dict[str, Any], cfg: ClassNetConfig) -> tuple[list[torch.Tensor], list[float]]:
    """From a ClassNet output: per CAM level that the read-out uses (``eval_fuse_weights`` > 0), the unit
    backbone features ``B,C,h,w`` and the level's weight, its share of the fuse weights times its logit scale,
    so that logits against image-specific prototypes are in the raw read-out's units."""
    w = list(cfg.eval_fuse_weights or [1.0] * len(out["cams"]))
    used = [i for i, v in enumerate(w) if v > 0]
    total = sum(w[i] for i in used)
    feats = [F.normalize(out["features"][i].float(), dim=1) for i in used]
    return feats, [w[i] / total * float(out["scales"][i]) for i in used]


@torch.inference_mode()
def predict_cams_and_features(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: ClassNetConfig,
    device: torch.device | str,
    *,
    flip: bool = False,
    features: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """:func:`predict_cams`' CAMs, and what image-specific prototypes are matched against
    (``engine/pseudo/image_prototypes.py``): :func:`cam_level_features`, flip-averaged with ``flip``.
    ``features=False``: the CAMs alone (empty lists), for models whose output has no features."""
    image = to_model_input(batch, cfg.mean, cfg.std, device)["image"]
    size = tuple(image.shape[-2:])  # the tiles enter the network at input_px, as in training
    image = resize_input(image, getattr(cfg, "input_px", None))
    return _cams_and_features(model, image, size, cfg, device, flip, features)


def _cams_and_features(
    model: nn.Module,
    image: torch.Tensor,
    size: tuple[int, int],
    cfg: ClassNetConfig,
    device: torch.device | str,
    flip: bool,
    features: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """:func:`predict_cams_and_features` on a normalised ``B,3,h,w`` image already at the network's scale;
    the CAMs come back at ``size`` (the pixels the caller scaled from)."""
    with _eval_mode(model):
        cams, feats, weights = None, None, []
        for mirrored in (False, True) if flip else (False,):
            x = image.flip(-1) if mirrored else image
            with autocast(device, cfg.amp):
                out = model(x)
            w = cfg.eval_fuse_weights
            c = _readout(
                fuse_cams(out["cams"], size, w), fuse_cams(out["cams"], size, w, normalize=False), cfg
            )
            f, weights = cam_level_features(out, cfg) if features else ([], [])
            if mirrored:
                c, f = c.flip(-1), [t.flip(-1) for t in f]
            cams = c if cams is None else (cams + c) / 2
            feats = f if feats is None else [F.normalize(a + b, dim=1) for a, b in zip(feats, f, strict=True)]
        return cams, feats, weights


def _readout(fused: torch.Tensor, raw: torch.Tensor, cfg: ClassNetConfig) -> torch.Tensor:
    """The CAMs the masks are taken from: min-max normalised (ties ordered by the raw CAM), or, with
    ``cam_readout: raw``, the per-pixel softmax over the classes of the raw fused cosine logits.

    Per-map min-max stretches every class to [0, 1] in every tile, so a class that is weak everywhere in
    a tile still wins its relatively strongest pixels; the softmax keeps the classes' relative scale (its
    argmax is the raw argmax) and stays in [0, 1], so stitching's zero for a class a tile lacks still
    means "not here". On GlaS the raw read-out scored 0.57-0.61 vs 0.51 (BENCHMARKS.md, issue 15)."""
    if getattr(cfg, "cam_readout", "minmax") == "raw":
        return raw.float().softmax(1)
    return _with_tie_break(fused, raw)


@torch.inference_mode()
def predict_masks(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: ClassNetConfig,
    device: torch.device | str,
    background: str | None = None,
    *,
    use_labels: bool = True,
    label_gate: float = 0.5,
    **mask_kw: Any,
) -> tuple[np.ndarray, torch.Tensor]:
    """Pseudo masks (uint8 ``B,H,W``, 0 = background) and fused CAMs ``B,N,H,W`` for one batch.

    ``use_labels=True`` restricts to the batch's image labels (PBIP's "oracle" labels at val/test, the
    tile labels on train); otherwise the last level's sigmoid > ``label_gate`` decides.
    """
    with _eval_mode(model):
        inp = to_model_input(batch, cfg.mean, cfg.std, device)
        fused, raw, logits = _fused(model, inp["image"], cfg, device)
        fused = _readout(fused, raw, cfg)  # the same CAMs the pseudo stage turns into masks
        if use_labels:
            if "labels" not in inp:
                raise KeyError("use_labels=True needs 'labels' in the batch")
            labels = inp["labels"]
        else:
            labels = (torch.sigmoid(logits[-1].float()) > label_gate).float()
        bg = background or cfg.eval_background
        rgb = rgb_uint8(batch, cfg.mean, cfg.std) if "white" in bg else None
        masks = cams_to_mask(fused, labels, bg, rgb=rgb, **mask_kw)
        return masks, fused


def evaluate_cams(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    cfg: ClassNetConfig,
    device: torch.device | str,
    n_classes: int,
    background: str | None = None,
    ignore_background: bool | None = None,
    *,
    use_labels: bool = True,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Pseudo-mask quality on batches with ``mask``: mIoU/FwIoU/Dice/bIoU from one confusion matrix."""
    ib = cfg.eval_ignore_background if ignore_background is None else ignore_background
    bg = background or cfg.eval_background
    meter = SegmentationMeter(n_classes, ignore_background=ib)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if "mask" not in batch:
            raise KeyError(f"evaluation batch {i} has no 'mask' (keys: {sorted(batch)})")
        masks, _ = predict_masks(model, batch, cfg, device, bg, use_labels=use_labels)
        truth = np.asarray(batch["mask"].cpu() if torch.is_tensor(batch["mask"]) else batch["mask"])
        meter.update(masks, truth.reshape(masks.shape))
    out = meter.compute()
    out["background"] = bg
    out["oracle_labels"] = use_labels
    return out


class PbipCamModel(MasksFromCams):
    """A trained ClassNet (rebuilt around the run's bank) that turns labelled tiles into pseudo masks."""

    def __init__(
        self,
        checkpoint: str | Path,
        bank_dir: str | Path,
        device: torch.device | str = "cpu",
        *,
        readout: dict[str, Any] | None = None,
    ) -> None:
        """``readout``: read-out keys (``cam_readout``, ``eval_fuse_weights``) from the spec, which win over
        the ones saved at training time (changing them does not retrain stage 1)."""
        p = Path(checkpoint)
        state = read_checkpoint(p, KIND, map_location=device)
        cfg = ClassNetConfig.from_dict({**state["model_config"], **(readout or {})})
        cfg.pretrained = False  # the checkpoint carries every weight
        protos, k_list, names = load_prototypes_from_bank(bank_dir)
        model = build_classnet(cfg, protos, k_list, n_classes=len(names))
        load_weights(p, model, state["model"], hint=" (different bank/backbone/classes?)")
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, device

    def predict_cams(self, batch: dict[str, Any], options: PseudoOptions) -> np.ndarray:
        return predict_cams(self.model, batch, self.cfg, self.device, flip=options.flip).float().cpu().numpy()

    def predict_cams_and_features(
        self, batch: dict[str, Any], options: PseudoOptions
    ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        """``predict_cams`` plus per used level the unit features ``B,C,h,w`` (float16) and the level weights
        (``pseudo.image_prototypes``)."""
        cams, feats, weights = predict_cams_and_features(
            self.model, batch, self.cfg, self.device, flip=options.flip
        )
        return cams.float().cpu().numpy(), [f.half().cpu().numpy() for f in feats], weights

    @torch.inference_mode()
    def predict_region(
        self, image: np.ndarray, tile_px: int, options: PseudoOptions, features: bool
    ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        """CAMs ``N,H,W`` of one uint8 ``H,W,3`` image at the tiles' pixel scale, read in one pass with all
        its context (``pseudo.cam_context: regions``): the image enters the network scaled as its tiles of
        ``tile_px`` were (to ``input_px``), so a feature cell covers the same tissue as in training. With
        ``features``: per used level the unit features ``C,h,w`` (float16) and the level weights."""
        from pbip_engine.engine.pseudo.region_cams import region_input

        input_px = getattr(self.cfg, "input_px", None)
        x = region_input(image, tile_px, input_px, self.cfg.mean, self.cfg.std, self.device)
        cams, feats, weights = _cams_and_features(
            self.model, x, tuple(image.shape[:2]), self.cfg, self.device, options.flip, features
        )
        return cams[0].float().cpu().numpy(), [f[0].half().cpu().numpy() for f in feats], weights
