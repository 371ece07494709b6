"""Gland CAMs as pseudo masks: the CAM (Eq. 4: ReLU, per-class max-normalised) at the tile's size.

Besides the tile-by-tile CAMs, the model offers what the pseudo stage's two context options read:

* ``predict_cams_and_features`` (``pseudo.image_prototypes``): the unit features the CAM head reads (after
  CCA), so each slide's CAMs can be re-read against prototypes of its own pixels. The head is a plain 1×1
  convolution with no cosine scale, so the prototype cosines get a fixed temperature (``PROTOTYPE_SCALE``).
* ``predict_region`` (``pseudo.cam_context: regions``): the CAMs of a whole stitched picture at the tiles'
  scale. CCA's position attention compares every feature cell with every other (O(cells²) memory), so the
  model states the largest picture it reads (``max_region_px``: ``MAX_REGION_NET_PX`` network pixels) and the
  pseudo stage cuts the stitched canvas in windows that fit it (``engine/pseudo/region_cams``): attention
  then spans a few tiles, not one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pbip_engine.engine.pseudo.cams import fuse_cams
from pbip_engine.engine.training.checkpoint import load_weights, read_checkpoint
from pbip_engine.methods.base import MasksFromCams, PseudoOptions
from pbip_engine.methods.gland.model import GlandNet, GlandNetConfig
from pbip_engine.methods.gland.task import KIND, model_input

TIE_EPS = 1e-3  # weight of the raw CAM folded in: orders classes whose normalised CAMs tie (both 0)
# Temperature of the cosines to a slide's own prototypes: PBIP's logit scale at initialisation (1 / 0.07),
# as the gland head learns no scale of its own.
PROTOTYPE_SCALE = 1.0 / 0.07
# Largest edge, in network pixels, of one region read: at output stride 8 that is 96 x 96 cells, whose
# position attention holds 9,216² energies (~340 MB in float32) per CCA block.
MAX_REGION_NET_PX = 768


def _maps(model: GlandNet, out: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    raw = out["cam"].float()
    if model.cfg.cam_source == "mpfp" and "mpfp" in out:
        raw = F.relu(out["mpfp"].float()) * F.relu(raw)
    norm = fuse_cams([raw], size)
    return norm * (1 - TIE_EPS) + TIE_EPS * torch.sigmoid(fuse_cams([raw], size, normalize=False))


def cam_maps(model: GlandNet, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B,N,H,W`` CAMs in [0, 1] at ``size``: ``cam_source`` map, upsampled, ReLU'd, min-max per class."""
    return _maps(model, model(image), size)


def cams_and_features(
    model: GlandNet,
    image: torch.Tensor,
    size: tuple[int, int],
    flip: bool,
    features: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`cam_maps` of a network-ready ``B,3,h,w`` image (flip-averaged with ``flip``) and, with
    ``features``, the unit features ``B,C,h',w'`` the CAM head reads (one level), flip-averaged too."""
    cams, feats = None, None
    for mirrored in (False, True) if flip else (False,):
        out = model(image.flip(-1) if mirrored else image)
        c = _maps(model, out, size)
        f = F.normalize(out["features"].float(), dim=1) if features else None
        if mirrored:
            c, f = c.flip(-1), (f.flip(-1) if f is not None else None)
        cams = c if cams is None else (cams + c) / 2
        if f is not None:
            feats = f if feats is None else F.normalize(feats + f, dim=1)
    assert cams is not None
    return cams, [feats] if feats is not None else []


class GlandCamModel(MasksFromCams):
    """A trained gland classifier that turns labelled tiles into CAMs and pseudo masks."""

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu") -> None:
        p = Path(checkpoint)
        state = read_checkpoint(p, KIND, map_location=device)
        cfg = GlandNetConfig.from_dict(state["model_config"])
        cfg.pretrained = False  # the checkpoint carries every weight
        model = GlandNet(cfg)
        load_weights(p, model, state["model"], hint=" (different backbone/classes/CCA settings?)")
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, device

    @torch.inference_mode()
    def predict_cams(self, batch: dict[str, Any], options: PseudoOptions) -> np.ndarray:
        inp = model_input({"image": batch["image"]}, self.cfg, self.device)
        cams, _ = cams_and_features(self.model, inp["image"], inp["size"], options.flip, False)
        return cams.float().cpu().numpy()

    @torch.inference_mode()
    def predict_cams_and_features(
        self, batch: dict[str, Any], options: PseudoOptions
    ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        """``predict_cams`` plus the unit features ``B,C,h,w`` (float16) of the CAM head's level and its
        weight (``pseudo.image_prototypes``)."""
        inp = model_input({"image": batch["image"]}, self.cfg, self.device)
        cams, feats = cams_and_features(self.model, inp["image"], inp["size"], options.flip, True)
        return cams.float().cpu().numpy(), [f.half().cpu().numpy() for f in feats], [PROTOTYPE_SCALE]

    def max_region_px(self, tile_px: int) -> int:
        """The largest picture edge (canvas px, tiles of ``tile_px``) one ``predict_region`` call may take:
        ``MAX_REGION_NET_PX`` once scaled to the network."""
        return max(16, int(MAX_REGION_NET_PX * tile_px / (self.cfg.input_px or tile_px)))

    @torch.inference_mode()
    def predict_region(
        self, image: np.ndarray, tile_px: int, options: PseudoOptions, features: bool
    ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        """CAMs ``N,H,W`` of one uint8 ``H,W,3`` picture (at most ``max_region_px`` a side) at the tiles'
        scale (``pseudo.cam_context: regions``): it enters the network scaled as its tiles of ``tile_px`` did
        (to ``input_px``). With ``features``: the unit features ``C,h,w`` (float16) and their weight."""
        from pbip_engine.engine.pseudo.region_cams import region_input

        x = region_input(image, tile_px, self.cfg.input_px, self.cfg.mean, self.cfg.std, self.device)
        cams, feats = cams_and_features(self.model, x, tuple(image.shape[:2]), options.flip, features)
        weights = [PROTOTYPE_SCALE] if features else []
        return cams[0].float().cpu().numpy(), [f[0].half().cpu().numpy() for f in feats], weights
