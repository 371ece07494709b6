"""SegFormer's Mix Transformer (MiT-B0/B1) encoder, written compactly with SegFormer's parameter names.

timm ships no MiT, and PBIP's ClassNet uses MiT-B1 with a configurable patch-embed stride ([4, 2, 2, 1]
keeps the last stage at 1/16 resolution). Parameter names follow SegFormer's ``mix_transformer.py`` so the
official ``mit_b1.pth`` (ImageNet-1k) loads directly; ``head.*`` (the classifier) is dropped on load.

The module mimics timm's ``features_only`` API: ``forward`` returns the selected stage maps and
``feature_info.channels()`` / ``feature_info.reduction()`` describe them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MiTSpec:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)


MIT_SPECS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
}

SEGFORMER_STRIDES = (4, 2, 2, 2)
PBIP_STRIDES = (4, 2, 2, 1)


class FeatureInfo:
    """The subset of timm's ``FeatureInfo`` the rest of the engine uses."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        self._channels = list(channels)
        self._reductions = list(reductions)

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced (sr_ratio) token grid."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (positional information without embeddings) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """Hierarchical MiT encoder returning the stage maps listed in ``out_indices`` (0-based stages)."""

    def __init__(
        self,
        spec: MiTSpec,
        strides: Sequence[int] = SEGFORMER_STRIDES,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        in_chans: int = 3,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(strides) != 4:
            raise ValueError(f"MiT needs 4 patch-embed strides, got {list(strides)}")
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"MiT out_indices must be a non-empty subset of 0..3, got {list(out_indices)}")
        self.out_indices = tuple(out_indices)
        dims = spec.embed_dims
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths)).tolist()
        cursor = 0
        reductions = []
        total = 1
        for i in range(4):
            patch = 7 if i == 0 else 3
            embed = OverlapPatchEmbed(patch, strides[i], in_chans if i == 0 else dims[i - 1], dims[i])
            blocks = nn.ModuleList(
                Block(dims[i], spec.num_heads[i], spec.mlp_ratios[i], spec.sr_ratios[i], rates[cursor + j])
                for j in range(spec.depths[i])
            )
            cursor += spec.depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))
            total *= strides[i]
            reductions.append(total)
        self.feature_info = FeatureInfo(
            [dims[i] for i in self.out_indices], [reductions[i] for i in self.out_indices]
        )
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(max(self.out_indices) + 1):
            x, h, w = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    # SegFormer's initialisation, so an un-pretrained MiT trains like the original.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def create_mit(
    name: str,
    strides: Sequence[int] = SEGFORMER_STRIDES,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    drop_path_rate: float = 0.1,
) -> MixTransformer:
    """Build ``mit_b0`` or ``mit_b1`` (random init; load weights with ``backbones.load_checkpoint_into``)."""
    if name not in MIT_SPECS:
        raise ValueError(f"unknown MiT variant {name!r}; known: {sorted(MIT_SPECS)}")
    return MixTransformer(MIT_SPECS[name], strides, out_indices, drop_path_rate=drop_path_rate)
