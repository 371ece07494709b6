"""Spatial attention blocks: criss-cross attention (CCNet), position attention (DANet) and the gland paper's CCA.

Written here because no maintained package ships a criss-cross attention that runs on CPU and GPU alike
(``mmcv.ops.CrissCrossAttention`` is a compiled CUDA/C++ extension without wheels for current torch;
``mmcv-lite`` leaves the ops out). Both blocks are vectorised einsums, no loop over pixels:

* criss-cross: each pixel attends to the pixels of its own row and column, O((h+w)·hw) energies.
  CCNet counts the pixel itself once (the column energy at its own row is masked with -inf, so
  h+w-1 positions, as in the gland paper's Eq. 1); the wsss_gland code leaves the mask out, so the pixel
  is seen twice (``mask_self=False``).
* position attention: every pixel attends to every pixel, O((hw)²) energies (the gland paper's Eq. 2
  with DANet's normalisation over the keys).

Each block is residual with a learnable scale ``gamma`` that starts at 0, so a block added to a
pretrained backbone is the identity until training moves it.
"""

from __future__ import annotations

import torch
from torch import nn


class _QueryKeyValue(nn.Module):
    """1×1 query/key convs to ``channels // reduction``, a value conv keeping ``channels``, a zero-init scale."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))


class CrissCrossAttention(_QueryKeyValue):
    """CCNet's criss-cross attention: query/key with ``channels // reduction`` channels, value with all."""

    def __init__(self, channels: int, reduction: int = 8, *, mask_self: bool = True) -> None:
        super().__init__(channels, reduction)
        self.mask_self = mask_self

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The column (``B,H,W,H``) and row (``B,H,W,W``) attention of every pixel, jointly softmaxed."""
        q, k = self.query(x), self.key(x)
        h = x.shape[2]
        e_col = torch.einsum("bchw,bcgw->bhwg", q, k)  # pixel (h, w) vs (g, w): its column
        e_row = torch.einsum("bchw,bchv->bhwv", q, k)  # pixel (h, w) vs (h, v): its row
        if self.mask_self:
            eye = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]  # (h, ., g): g == h
            e_col = e_col.masked_fill(eye, float("-inf"))
        a = torch.softmax(torch.cat([e_col, e_row], -1).float(), -1).to(q.dtype)
        return a[..., :h], a[..., h:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_col, a_row = self.attention(x)
        v = self.value(x)
        out = torch.einsum("bhwg,bcgw->bchw", a_col, v) + torch.einsum("bhwv,bchv->bchw", a_row, v)
        return self.gamma * out + x


class PositionAttention(_QueryKeyValue):
    """DANet's position attention module: every pixel against every pixel, query/key of ``channels // reduction``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # B,C',N
        k = self.key(x).flatten(2)
        a = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k).float(), -1).to(q.dtype)  # query n, keys m
        out = torch.einsum("bnm,bcm->bcn", a, self.value(x).flatten(2)).view(b, c, h, w)
        return self.gamma * out + x


class ConsistencyCorrelationAttention(nn.Module):
    """The gland paper's CCA (Fig. 2b): criss-cross -> position attention (c' = c/4) -> criss-cross."""

    def __init__(
        self, channels: int, *, cc_reduction: int = 8, pam_reduction: int = 4, mask_self: bool = True
    ) -> None:
        super().__init__()
        self.cc1 = CrissCrossAttention(channels, cc_reduction, mask_self=mask_self)
        self.pam = PositionAttention(channels, pam_reduction)
        self.cc2 = CrissCrossAttention(channels, cc_reduction, mask_self=mask_self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cc2(self.pam(self.cc1(x)))

    def after(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        """A forward hook that applies CCA to a backbone stage's output (``register_forward_hook(cca.after)``).

        A bound method rather than a closure, so that a deep-copied network calls its own copy of the block.
        """
        return self(output)
