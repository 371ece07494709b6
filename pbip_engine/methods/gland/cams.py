"""Gland CAMs as pseudo masks: the CAM (Eq. 4: ReLU, per-class max-normalised) at the tile's size."""

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


def cam_maps(model: GlandNet, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B,N,H,W`` CAMs in [0, 1] at ``size``: ``cam_source`` map, upsampled, ReLU'd, min-max per class."""
    out = model(image)
    raw = out["cam"].float()
    if model.cfg.cam_source == "mpfp" and "mpfp" in out:
        raw = F.relu(out["mpfp"].float()) * F.relu(raw)
    norm = fuse_cams([raw], size)
    return norm * (1 - TIE_EPS) + TIE_EPS * torch.sigmoid(fuse_cams([raw], size, normalize=False))


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
        image, size = inp["image"], inp["size"]
        cams = cam_maps(self.model, image, size)
        if options.flip:
            cams = (cams + cam_maps(self.model, image.flip(-1), size).flip(-1)) / 2
        return cams.float().cpu().numpy()
