"""LPD's pseudo masks: the same fused, label-restricted CAMs as PBIP (``pbip.cams``), from a checkpoint that
carries its own prototypes (no bank needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pbip_engine.engine.training.checkpoint import load_weights, read_checkpoint
from pbip_engine.methods.lpd.model import LpdNet, LpdNetConfig, build_lpdnet
from pbip_engine.methods.lpd.task import KIND
from pbip_engine.methods.pbip.cams import PbipCamModel


def load_lpdnet(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    backbone: nn.Module | None = None,
    readout: dict[str, Any] | None = None,
) -> tuple[LpdNet, LpdNetConfig]:
    """The trained LpdNet of a stage-1 checkpoint (built from the config stored in it), in eval mode.

    ``backbone``: an untrained module of the checkpoint's architecture where the config cannot name it (tests).
    ``readout``: the spec's read-out keys, which win over the ones saved at training time."""
    p = Path(checkpoint)
    state = read_checkpoint(p, KIND, map_location=device)
    cfg = LpdNetConfig.from_dict({**state["model_config"], **(readout or {})})
    cfg.pretrained = False  # the checkpoint carries every weight
    n_classes = int(state["model"]["prototypes"].shape[0]) // cfg.k
    model = build_lpdnet(cfg, n_classes, backbone=backbone)
    load_weights(p, model, state["model"], hint=" (different backbone/classes/k?)")
    return model.to(device).eval(), cfg


class LpdCamModel(PbipCamModel):
    """A trained LpdNet that turns labelled tiles into fused CAMs / pseudo masks (PBIP's rules)."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: torch.device | str = "cpu",
        backbone: nn.Module | None = None,
        *,
        readout: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.cfg = load_lpdnet(checkpoint, device, backbone, readout)
        self.device = device
