"""The gland method's ``method:`` keys (spec), with the paper's defaults; the reference code's deviations as options.

Where the public wsss_gland code (director87/wsss_gland @ deea66c) differs from the paper:

* ``cca_mask_self: false``: its criss-cross attention does not mask the pixel's own position (CCNet does).
* ``cam_relu: true``: its CAMs are ReLU'd before MPFP, so Eq. 9's negative term is always 0.
* ``segmenter.plf``: ``normalize: range`` and ``confidence: max`` (spec ``segmenter:`` section).

Not reproduced: its criss-cross softmax over dim 1 (a bug: it normalises over image rows, not over each
pixel's cross), the PDA feature step, and the ResNet-38 backbone (we use timm ``features_only`` CNNs with
``output_stride`` for the ResNet-38d-like 1/8 output).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pbip_engine.methods.base import MethodConfig


class GlandConfig(MethodConfig):
    name: Literal["gland"] = "gland"
    backbone: str = Field("efficientnet_lite0", description="a timm CNN with features_only and output_stride")
    backbone_checkpoint: str | None = None
    level: int = Field(4, ge=1, le=4, description="feature level the CAM head reads (4 = deepest)")
    output_stride: Literal[8, 16, 32] = Field(
        8, description="backbone output stride (dilated last stages; ResNet-38d's is 8)"
    )
    input_px: int | None = Field(
        224, ge=32, description="tiles are resized to this edge for stage 1 (OEEM: 112-px GlaS patches at 224); "
        "null = tiling.tile_px",
    )  # fmt: skip
    cca: bool = Field(True, description="Consistency Correlation Attention after the cca_levels' last layers")
    cca_levels: list[int] = Field(
        default_factory=lambda: [2, 3, 4],
        description="feature levels whose last layer CCA follows (paper: ResNet-38 stages 4-6 = the deepest 3)",
    )
    cca_mask_self: bool = Field(True, description="CCNet's -inf on the pixel's own position; code: false")
    cc_reduction: int = Field(8, ge=1, description="criss-cross query/key channels = c / this")
    pam_reduction: int = Field(4, ge=1, description="position attention query/key channels c' = c / this")
    mpfp: bool = Field(True, description="Multi-scale Pyramid Fusion Pooling for the image logits (else GAP)")
    mpfp_sizes: list[int] = Field(default_factory=lambda: [2, 4, 8, 16], description="pooling sizes τ")
    mpfp_fusion: Literal["sign_preserving", "average"] = "sign_preserving"
    cam_relu: bool = Field(
        False, description="ReLU the CAM before MPFP (the code); paper Eq. 9 keeps its sign"
    )
    cam_source: Literal["cam", "mpfp"] = Field(
        "cam",
        description="pseudo masks from the CAM (Eq. 4, the code's Net_CAM) or the CAM weighted by MPFP's map",
    )
    new_parts_lr_mult: float = Field(10.0, gt=0, description="lr multiple of the head, CCA and MPFP gates")

    @model_validator(mode="after")
    def _levels(self) -> GlandConfig:
        bad = [v for v in self.cca_levels if not 1 <= v <= self.level]
        if bad:
            raise ValueError(f"method.cca_levels {bad} must lie in 1..method.level ({self.level})")
        if any(t < 1 for t in self.mpfp_sizes) or not self.mpfp_sizes:
            raise ValueError(f"method.mpfp_sizes must be >= 1, got {self.mpfp_sizes}")
        return self

    def reduction(self, level: int) -> int:
        """Downsampling of feature ``level`` (timm's 2**(level+1), capped by ``output_stride``)."""
        return min(2 ** (level + 1), self.output_stride)

    def cam_px(self, tile_px: int) -> int:
        """Edge of the CAM at stage-1 input (``input_px`` or the tile)."""
        inp = self.input_px or tile_px
        return -(-inp // self.reduction(self.level))

    def check_spec(self, spec: Any) -> None:
        tile = spec.tiling.tile_px
        cam = self.cam_px(tile)
        if self.mpfp and max(self.mpfp_sizes) > cam:
            src = f"method.input_px={self.input_px}" if self.input_px else f"tiling.tile_px={tile}"
            raise ValueError(
                f"method.mpfp_sizes {self.mpfp_sizes}: τ={max(self.mpfp_sizes)} exceeds the {cam}x{cam} CAM at "
                f"{src} (method.output_stride={self.output_stride}); lower the sizes or raise the input size"
            )
