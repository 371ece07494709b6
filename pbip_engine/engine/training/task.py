"""What the training loop trains: a task module whose ``forward(batch)`` returns the loss and logged values.

The seam every method plugs into (timm's ``TrainingTask`` idea): a task owns the trainable network
(``self.model``, the only part wrapped for DDP and written to checkpoints) and any frozen helpers (a
bank encoder, a teacher) that stay out of DDP and out of the optimiser. The loop never needs to know
which method it is running.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pbip_engine.engine.training.inputs import unwrap


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay only on weights of two or more dimensions: not biases, norms or logit scales."""
    return p.ndim >= 2 and "logit_scale" not in name


def backbone_and_new_groups(
    model: nn.Module, is_new: Callable[[str, torch.nn.Parameter], bool], new_lr_mult: float
) -> list[dict[str, Any]]:
    """Optimiser groups: a pretrained backbone at the base rate, fresh parts (``is_new``) at ``new_lr_mult``,
    each split by the weight-decay rule (``decays``)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_new(name, p), decays(name, p)), []).append(p)
    out = []
    for (new, decay), params in sorted(groups.items()):
        g: dict[str, Any] = {
            "params": params,
            "name": f"{'new' if new else 'backbone'}{'' if decay else '_no_decay'}",
        }
        if not decay:
            g["weight_decay"] = 0.0
        if new:
            g["lr_mult"] = new_lr_mult
        out.append(g)
    return out


class TrainTask(nn.Module):
    """Base class: subclasses set ``kind`` and ``self.model`` and implement ``prepare`` and ``forward``."""

    kind: str = "task"
    model: nn.Module

    def prepare(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """Raw loader batch (uint8 numpy) -> tensors on ``device`` (runs outside autocast)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"loss": scalar tensor, <name>: float, ...}``; every non-loss value is averaged per epoch."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups over the trainable parameters; ``lr_mult`` scales the loop's base rate.

        Default: weight decay on weights of two or more dimensions only (biases, norms and scales are
        not decayed). Methods override to give new parts a higher rate than a pretrained backbone.
        """
        decay, no_decay = [], []
        for name, p in unwrap(self.model).named_parameters():
            if p.requires_grad:
                (decay if decays(name, p) else no_decay).append(p)
        return [
            {"params": decay, "name": "decay"},
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
        ]

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the trainable model (DDP / Ray Train's ``prepare_model``); frozen parts stay as they are."""
        self.model = fn(self.model)

    def model_config(self) -> dict[str, Any] | None:
        """What rebuilds the trained model without the spec (stored in the checkpoint)."""
        return None

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Mapping[str, Any]], device: torch.device) -> dict[str, Any]:
        """Validation metrics with a ``score`` to maximise; default: the negative mean validation loss."""
        was = self.training
        self.eval()
        total = n = 0.0
        try:
            for raw in batches:
                out = self(self.prepare(raw, device))
                total += float(out["loss"])
                n += 1
        finally:
            self.train(was)
        loss = total / n if n else math.nan
        return {"loss": loss, "score": -loss}
