"""LPD stage 1 as a loop task: PBIP's task (param groups, frozen encoder, CAM validation) with LPD's step."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from pbip_engine.methods.lpd.model import lpd_step
from pbip_engine.methods.pbip.task import PbipTask

KIND = "stage1:lpd"


class LpdTask(PbipTask):
    """``L_cls + lambda_sim * L_sim + lambda_div * L_div``; the prototypes train with the heads (new parts)."""

    kind = KIND

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        loss, stats = lpd_step(self.model, self.bank_encoder, batch, self.cfg)
        return {"loss": loss, **stats}

    @torch.no_grad()
    def evaluate(self, batches, device: torch.device) -> dict[str, Any]:
        """CAM mIoU where validation batches carry masks; else the negative validation *classification* loss.

        Not the total: L_sim and L_div switch on after the warm-up, so the total of an epoch before it and
        one after are different sums, and the best checkpoint would simply be the last warm-up epoch.
        """
        batches = iter(batches)
        first = next(batches, None)
        if first is not None and "mask" in first:
            return super().evaluate(itertools.chain([first], batches), device)
        was = self.training
        self.eval()
        total = n = 0.0
        try:
            for raw in itertools.chain([first], batches) if first is not None else []:
                total += float(self(self.prepare(raw, device))["l_cls"])
                n += 1
        finally:
            self.train(was)
        loss = total / n if n else math.nan
        return {"loss": loss, "l_cls": loss, "score": -loss}
