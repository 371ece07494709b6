"""LPD stage 1 as a loop task: PBIP's task (param groups, frozen encoder, CAM validation) with LPD's step."""

from __future__ import annotations

from typing import Any

from pbip_engine.methods.lpd.model import lpd_step
from pbip_engine.methods.pbip.task import PbipTask

KIND = "stage1:lpd"


class LpdTask(PbipTask):
    """``L_cls + lambda_sim * L_sim + lambda_div * L_div``; the prototypes train with the heads (new parts)."""

    kind = KIND

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        loss, stats = lpd_step(self.model, self.bank_encoder, batch, self.cfg)
        return {"loss": loss, **stats}
