"""LPD's ``method:`` keys (spec), with the paper's defaults where it gives them and the reference code's elsewhere."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pbip_engine.methods.pbip.config import CamReadoutConfig


class LpdConfig(CamReadoutConfig):
    name: Literal["lpd"] = "lpd"
    backbone: str = "efficientnet_lite0"
    backbone_checkpoint: str | None = None
    hidden: int = Field(256, ge=8, description="width of the per-level prototype heads phi_i")
    k: int = Field(10, ge=1, description="learnable prototypes per class (paper's best: 10; 3 also reported)")
    proto_dim: int = Field(
        512, ge=2, description="d_proto of the learnable prototypes; with init: bank the bank's dimension"
    )
    init: Literal["random", "bank"] = Field(
        "random",
        description="random: N(0, 1) prototypes (the paper); bank: start from the bank's k-means prototypes "
        "(runs the bank stage; not in the paper)",
    )
    merge: Literal["mean", "softmax_max"] = Field(
        "softmax_max", description="how a class's k prototype maps become its CAM (paper: attention)"
    )
    delta: float = Field(0.5, ge=0, le=1, description="alpha of the FG threshold t = alpha * max (ref. 0.5)")
    threshold: Literal["per_class", "per_image"] = "per_class"
    tau: float = Field(0.07, gt=0, description="InfoNCE temperature, shared by FG and BG (paper/ref 0.07)")
    hard_negatives: int = Field(
        0, ge=0, description="other-class prototypes per FG sample in the InfoNCE; 0 = all of them"
    )
    lambda_sim: float = Field(0.1, ge=0, description="weight of L_sim = l_fg + l_bg (ref. 0.1)")
    lambda_div: float = Field(0.5, ge=0, description="weight of the diversity regulariser (paper/ref 0.5)")
    div_level: int = Field(
        -1, description="which of ``levels`` (index) gives the features f(x) for the diversity term"
    )
    div_tau: float = Field(1.0, gt=0, description="temperature of the softmax over Omega_c (paper: 1)")
    warmup_iters: int = Field(
        3000, ge=0, description="iterations of classification only before L_sim and L_div (ref. 3000)"
    )
    new_parts_lr_mult: float = Field(
        1.0, gt=0, description="LR multiple of prototypes, heads, psi and logit scales over the backbone"
    )
    use_sim: bool = True
    sim_size: int | None = Field(
        None, ge=32, description="edge of the FG/BG crops fed to the frozen encoder; default its input size"
    )
    atlas_tiles: int = Field(
        2000,
        ge=0,
        description="labelled tiles scanned for the prototype atlas (classnet/atlas.png); 0 = none",
    )
