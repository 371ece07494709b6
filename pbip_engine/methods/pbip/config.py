"""PBIP's ``method:`` keys (spec), with the paper's defaults; ``VARIANTS`` in ``classnet`` lists the reference code's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pbip_engine.methods.base import MethodConfig


class PbipConfig(MethodConfig):
    name: Literal["pbip"] = "pbip"
    backbone: str = "efficientnet_lite0"
    backbone_checkpoint: str | None = None
    levels: list[int] = Field(default_factory=lambda: [2, 3, 4])
    hidden: int = Field(256, ge=8)
    merge_train: Literal["mean", "softmax_max"] = "mean"
    merge_eval: Literal["mean", "softmax_max"] = "mean"
    delta: float = Field(0.15, ge=0, le=1)
    threshold: Literal["per_class", "per_image"] = "per_class"
    alpha: float = 1.0
    beta: float = 0.5
    tau: float = Field(1.0, gt=0)
    theta1: float = 1.0
    theta2: float = 0.5
    new_parts_lr_mult: float = Field(
        1.0,
        gt=0,
        description="learning-rate multiple of the freshly initialised prototype projectors and logit scale "
        "over the pretrained backbone (stage1.lr)",
    )
    use_sim: bool = True
    sim_size: int | None = Field(
        None,
        ge=32,
        description="edge of the FG/BG images fed to the bank encoder; default its input size (224). "
        "CNN encoders accept the tile size: with small tiles that makes L_SIM several times cheaper",
    )
