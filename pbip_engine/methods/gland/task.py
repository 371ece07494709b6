"""Gland stage 1 as a loop task: multi-label BCE on the image logits (GAP or MPFP) of tiles resized to ``input_px``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from pbip_engine.engine.training.inputs import to_model_input, unwrap
from pbip_engine.engine.training.task import TrainTask, backbone_and_new_groups
from pbip_engine.methods.gland.model import GlandNet, GlandNetConfig

KIND = "stage1:gland"


def model_input(batch: Mapping[str, Any], cfg: GlandNetConfig, device: torch.device | str) -> dict[str, Any]:
    """Normalised tensors, the image resized to ``cfg.input_px`` (the size the CAM head was trained at);
    ``size`` is the image's own size, at which the CAMs are returned."""
    out = to_model_input(dict(batch), cfg.mean, cfg.std, device)
    x = out["image"]
    out["size"] = tuple(x.shape[-2:])
    if cfg.input_px and tuple(x.shape[-2:]) != (cfg.input_px, cfg.input_px):
        out["image"] = F.interpolate(
            x, size=(cfg.input_px, cfg.input_px), mode="bilinear", align_corners=False
        )
    return out


class GlandTask(TrainTask):
    """The paper's classification loss: sigmoid BCE of Eq. 3 / Eq. 9 logits against the image-level labels."""

    kind = KIND

    def __init__(self, model: GlandNet, new_parts_lr_mult: float = 10.0) -> None:
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.new_parts_lr_mult = new_parts_lr_mult

    def prepare(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        return model_input(batch, self.cfg, device)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.model(batch["image"])
        loss = F.binary_cross_entropy_with_logits(out["logits"].float(), batch["labels"])
        return {"loss": loss, "bce": float(loss.detach())}

    def param_groups(self) -> list[dict[str, Any]]:
        """The pretrained backbone at the base rate; the head, CCA and MPFP gates at ``new_parts_lr_mult``."""
        m = unwrap(self.model)
        new = {id(p) for p in m.new_parameters()}
        return backbone_and_new_groups(m, lambda name, p: id(p) in new, self.new_parts_lr_mult)

    def model_config(self) -> dict[str, Any]:
        return self.cfg.to_dict()
