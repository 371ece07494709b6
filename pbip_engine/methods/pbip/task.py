"""PBIP stage 1 as a loop task: ClassNet trains (DDP-wrapped), the bank encoder stays frozen outside DDP."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pbip_engine.engine.training.inputs import to_model_input, unwrap
from pbip_engine.engine.training.task import TrainTask, backbone_and_new_groups
from pbip_engine.methods.pbip.classnet import ClassNetConfig, classnet_step, freeze_encoder, resize_input

KIND = "stage1:pbip"


class PbipTask(TrainTask):
    """Eq. 6: ``alpha * L_CLS + beta * (theta1 * L_FGS + theta2 * L_BGS)`` on image-level labels."""

    kind = KIND

    def __init__(self, model: nn.Module, cfg: ClassNetConfig, bank_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        # Frozen: a plain attribute list keeps the encoder out of DDP, the optimiser and state_dict.
        self._frozen = [freeze_encoder(bank_encoder)] if bank_encoder is not None else []

    @property
    def bank_encoder(self) -> nn.Module | None:
        return self._frozen[0] if self._frozen else None

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() move the frozen encoder too
        for m in self._frozen:
            m._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def prepare(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        out = to_model_input(dict(batch), self.cfg.mean, self.cfg.std, device)
        out["image"] = resize_input(out["image"], getattr(self.cfg, "input_px", None))
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        loss, stats = classnet_step(self.model, self.bank_encoder, batch, self.cfg)
        return {"loss": loss, **stats}

    def param_groups(self) -> list[dict[str, Any]]:
        """The pretrained backbone at the base rate; the fresh projectors and logit scale at ``new_parts_lr_mult``.

        Weight decay only on weights of two or more dimensions (not biases, norms or the logit scale).
        """
        return backbone_and_new_groups(
            unwrap(self.model), lambda name, p: not name.startswith("backbone."), self.cfg.new_parts_lr_mult
        )

    def model_config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    @torch.no_grad()
    def evaluate(self, batches, device: torch.device) -> dict[str, Any]:
        """CAM mIoU where validation batches carry masks; else the negative validation loss (labels only)."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return super().evaluate([], device)
        batches = itertools.chain([first], batches)
        if "mask" in first:
            from pbip_engine.methods.pbip.cams import evaluate_cams

            out = evaluate_cams(self.model, batches, self.cfg, device, unwrap(self.model).n_classes)
            out["score"] = out["miou"]
            return out
        return super().evaluate(batches, device)
