"""Multi-scale Pyramid Fusion Pooling (gland paper, Eq. 5-9, Fig. 2c): image logits from a CAM, instead of GAP.

The CAM ``F`` (``B,N,h,w``) is average-pooled to ``τ×τ`` for each τ in ``sizes`` (2, 4, 8, 16: coarse to
fine), upsampled back to ``h×w`` (bilinear) and fused coarse-to-fine by sign-preserving convolutions:
positive and negative parts are gated separately (Eq. 6-8), so a region that says "class absent" keeps
its sign instead of being averaged away. The image logit (Eq. 9, before the sigmoid) is
``mean(δ(P')·δ(F)) - mean(δ(-P')·δ(-F))``: the CAM weighted pixel by pixel by the fused pyramid.

``fusion="average"`` is the paper's Table 4 baseline: the pyramid maps simply averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Fusion = Literal["sign_preserving", "average"]


class SignPreservingFusion(nn.Module):
    """One pyramid step (Eq. 6-8): two 3×3 gates (positive, negative) over ``2N`` channels -> 2 weights each."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.pos_gate = nn.Conv2d(2 * n_classes, 2, 3, padding=1)
        self.neg_gate = nn.Conv2d(2 * n_classes, 2, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pa, pb, na, nb = F.relu(a), F.relu(b), F.relu(-a), F.relu(-b)
        pos = torch.sigmoid(self.pos_gate(torch.cat([pa, pb], 1)))  # Eq. 5-6: S(a, b)
        neg = torch.sigmoid(self.neg_gate(torch.cat([na, nb], 1)))  # Eq. 7: S(-a, -b)
        return (pa * pos[:, :1] + pb * pos[:, 1:]) / 2 - (na * neg[:, :1] + nb * neg[:, 1:]) / 2  # Eq. 8


class PyramidFusionPooling(nn.Module):
    """MPFP over a CAM: ``forward(cam)`` returns the fused map P' (``B,N,h,w``); ``logits(cam)`` Eq. 9."""

    def __init__(
        self, n_classes: int, sizes: Sequence[int] = (2, 4, 8, 16), fusion: Fusion = "sign_preserving"
    ):
        super().__init__()
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"MPFP pooling sizes must be >= 1, got {list(sizes)}")
        self.sizes = tuple(sorted(sizes))
        self.fusion = fusion
        n_steps = len(self.sizes) - 1 if fusion == "sign_preserving" else 0
        self.steps = nn.ModuleList(SignPreservingFusion(n_classes) for _ in range(n_steps))

    def pyramid(self, cam: torch.Tensor) -> list[torch.Tensor]:
        """P_τ for every τ, pooled to ``τ×τ`` and upsampled back to the CAM's size."""
        size = tuple(cam.shape[-2:])
        return [
            F.interpolate(F.adaptive_avg_pool2d(cam, t), size=size, mode="bilinear", align_corners=False)
            for t in self.sizes
        ]

    def forward(self, cam: torch.Tensor) -> torch.Tensor:
        levels = self.pyramid(cam)
        if self.fusion == "average":
            return torch.stack(levels).mean(0)
        fused = levels[0]
        for step, finer in zip(self.steps, levels[1:], strict=True):
            fused = step(fused, finer)
        return fused

    def logits(self, cam: torch.Tensor) -> torch.Tensor:
        """Eq. 9 before the sigmoid: ``B,N`` image logits from the CAM weighted by the fused pyramid."""
        return weighted_logits(cam, self(cam))


def weighted_logits(cam: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mean(δ(W)·δ(F)) - mean(δ(-W)·δ(-F))`` over pixels (Eq. 9's numerator over h×w)."""
    pos = (F.relu(weight) * F.relu(cam)).mean((2, 3))
    neg = (F.relu(-weight) * F.relu(-cam)).mean((2, 3))
    return pos - neg
