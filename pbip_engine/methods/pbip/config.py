"""PBIP's ``method:`` keys (spec), with the paper's defaults; ``VARIANTS`` in ``classnet`` lists the reference code's.

Some of those variants' settings (``sim_loss``, ``normalize_prototypes``, ``level_weights``, ``fuse_weights``,
``cam_penalty``) are not spec keys: they are reached through ``ClassNetConfig.from_variant`` only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pbip_engine.methods.base import MethodConfig

# How a trained network's CAMs are read (not how it trains): changing them re-runs the pseudo stage only.
CAM_READOUT_KEYS = frozenset({"cam_readout", "eval_fuse_weights"})


class CamReadoutConfig(MethodConfig):
    """The CAM keys every prototype-cosine ClassNet (PBIP, LPD) shares: the network's input size and how its
    fused CAMs are read into pseudo masks. Shared so that the methods compare on the same protocol."""

    levels: list[int] = Field(default_factory=lambda: [2, 3, 4])
    input_px: int | None = Field(
        None,
        ge=32,
        description="tiles are resized to this edge for the network (OEEM feeds 112-px GlaS patches at 224): "
        "finer CAMs at more compute; None = the tile as it is",
    )
    cam_readout: Literal["minmax", "raw"] = Field(
        "minmax",
        description="pseudo masks from the fused CAMs min-max normalised per map (paper) or raw (a softmax "
        "over the classes of their cosine logits: the classes keep their relative scale); a read-out key: "
        "changing it re-runs the pseudo stage, not stage 1",
    )
    eval_fuse_weights: list[float] | None = Field(
        None,
        description="weights of the CAM levels in the pseudo masks (one per level); None = equal (Eq. 3); "
        "a read-out key (no retraining)",
    )

    def check_spec(self, spec: Any) -> None:
        if self.eval_fuse_weights is not None:
            if len(self.eval_fuse_weights) != len(self.levels):
                raise ValueError(f"method.eval_fuse_weights has {len(self.eval_fuse_weights)} entries but "
                                 f"method.levels {self.levels} has {len(self.levels)}")  # fmt: skip
            if min(self.eval_fuse_weights) < 0 or sum(self.eval_fuse_weights) <= 0:
                raise ValueError(
                    f"method.eval_fuse_weights must be >= 0 and not all 0, got {self.eval_fuse_weights}"
                )


class PbipConfig(CamReadoutConfig):
    name: Literal["pbip"] = "pbip"
    backbone: str = "efficientnet_lite0"
    backbone_checkpoint: str | None = None
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
    pooling: Literal["gap", "competitive"] = Field(
        "gap",
        description="image logits from the CAMs: gap = the paper's global average pooling; competitive = "
        "a per-pixel softmax over the classes, each class scored on its top pool_top pixels (present "
        "classes must split a tile between them: sharper CAMs where most tiles hold several classes)",
    )
    pool_top: float = Field(0.1, gt=0, le=1, description="competitive pooling: fraction of a tile's pixels")
    use_sim: bool = True
    sim_size: int | None = Field(
        None,
        ge=32,
        description="edge of the FG/BG images fed to the bank encoder; default its input size (224). "
        "CNN encoders accept the tile size: with small tiles that makes L_SIM several times cheaper",
    )
