"""The gland classifier: a timm CNN with CCA after its deepest stages, a 1×1 CAM head, GAP or MPFP logits.

CCA modules are attached with forward hooks on the backbone modules that end each chosen feature level
(timm's ``feature_info`` names them), so the attention output feeds the next stage, as the paper places
CCA "at the last layer" of stages 4-6, for any timm ``features_only`` CNN without rewriting it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.nn.attention import ConsistencyCorrelationAttention
from pbip_engine.engine.nn.backbones import BackboneError, create_backbone
from pbip_engine.engine.nn.mpfp import PyramidFusionPooling, weighted_logits
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class GlandNetConfig:
    """What rebuilds the network (stored in checkpoints); the spec's ``method:`` keys plus the class count."""

    n_classes: int
    backbone: str = "efficientnet_lite0"
    pretrained: bool | str = True
    level: int = 4
    output_stride: int = 8
    input_px: int | None = 224
    cca: bool = True
    cca_levels: list[int] = field(default_factory=lambda: [2, 3, 4])
    cca_mask_self: bool = True
    cc_reduction: int = 8
    pam_reduction: int = 4
    mpfp: bool = True
    mpfp_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    mpfp_fusion: str = "sign_preserving"
    cam_relu: bool = False
    cam_source: str = "cam"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GlandNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _module(backbone: nn.Module, name: str) -> nn.Module:
    for candidate in (name, name.replace(".", "_")):  # FeatureListNet flattens dotted names
        try:
            return backbone.get_submodule(candidate)
        except AttributeError:
            continue
    raise BackboneError(f"cannot find backbone module {name!r} to attach CCA to")


class GlandNet(nn.Module):
    """``forward(x) -> {"cam": B,N,h,w, "logits": B,N, "features": B,C,h,w}``; logits by MPFP (Eq. 9) or GAP (Eq. 3)."""

    def __init__(self, cfg: GlandNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(
            cfg.backbone, cfg.pretrained, out_indices=(cfg.level,), output_stride=cfg.output_stride
        )
        info = self.backbone.feature_info
        self.cca = nn.ModuleDict()
        if cfg.cca:
            for lv in cfg.cca_levels:
                ch = int(info.info[lv]["num_chs"])
                block = ConsistencyCorrelationAttention(ch, cc_reduction=cfg.cc_reduction,
                                                        pam_reduction=cfg.pam_reduction,
                                                        mask_self=cfg.cca_mask_self)  # fmt: skip
                self.cca[str(lv)] = block
                _module(self.backbone, info.info[lv]["module"]).register_forward_hook(block.after)
        self.head = nn.Conv2d(int(info.info[cfg.level]["num_chs"]), cfg.n_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.head.weight)
        self.mpfp = PyramidFusionPooling(cfg.n_classes, cfg.mpfp_sizes, cfg.mpfp_fusion) if cfg.mpfp else None  # type: ignore[arg-type]

    @property
    def n_classes(self) -> int:
        return self.cfg.n_classes

    def new_parameters(self) -> list[nn.Parameter]:
        mods = [self.head, self.cca] + ([self.mpfp] if self.mpfp is not None else [])
        return [p for m in mods for p in m.parameters()]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)[-1]
        cam = self.head(feats)
        if self.cfg.cam_relu:
            cam = F.relu(cam)
        out = {"cam": cam, "features": feats}  # features: what image-specific prototypes are taken from
        if self.mpfp is None:
            out["logits"] = cam.mean((2, 3))  # Eq. 3 (before the sigmoid)
        else:
            fused = self.mpfp(cam)
            out["mpfp"] = fused
            out["logits"] = weighted_logits(cam, fused)  # Eq. 9
        return out
