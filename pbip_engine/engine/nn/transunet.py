"""TransUNet-style segmenter: a CNN or ViT encoder, TransUNet's cascaded upsampler (CUP) decoder.

TransUNet (Chen et al. 2021) upsamples the encoder's deepest map ×2 four times, concatenating skip
features where the encoder has them. Over a plain ViT (UNI ViT-L/16, any timm ViT) the only map is the
patch-token grid at 1/16 and the decoder has no skips; over a ``features_only`` CNN (the offline default,
``efficientnet_lite0``) the 1/16, 1/8, 1/4 maps are the skips, as ResNet's are in TransUNet-R50.

Besides the logits the network can return what semi-supervised training needs (MPAMatch/UniMatch):
pixel embeddings at 1/4 (``emb``, L2-normalised, ``proj_dim``), logits of a feature-perturbed copy
(``fp``: channel dropout on every encoder map, UniMatch's FP stream), and it holds the learnable text-prompt
context and projection plus the image-prototype memory, so the one trained module is what checkpoints
save and what ``segmenter_from_config`` rebuilds; inference calls ``model(x)`` and gets logits only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.nn.backbones import BackboneError, create_backbone, feature_channels, load_into
from pbip_engine.engine.nn.deeplab import SegmenterError
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD

DECODER_CHANNELS = (256, 128, 64, 16)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class _UpBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv(cin + skip, cout), _conv(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.convs(x if skip is None else torch.cat([x, skip], 1))


class ViTGrid(nn.Module):
    """A timm ViT as a one-level ``features_only`` encoder: patch tokens reshaped to their 1/16 grid."""

    def __init__(self, name: str, pretrained: bool | str | Path, **kw: Any) -> None:
        super().__init__()
        import timm

        if pretrained is True:
            raise BackboneError(f"{name}: no network access for ViT weights; give a checkpoint path or False")
        self.vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
        if pretrained:
            from pbip_engine.engine.nn.backbones import read_state_dict

            self.load_report = load_into(self.vit, read_state_dict(pretrained), source=str(pretrained))
        self.patch = int(self.vit.patch_embed.patch_size[0])
        self.channels = int(self.vit.num_features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        return [tokens.transpose(1, 2).reshape(x.shape[0], self.channels, h, w)]


def is_vit(name: str) -> bool:
    key = name[5:] if name.startswith("timm:") else name
    return key.startswith(("vit_", "deit", "eva"))


class TransUNet(nn.Module):
    """Encoder + CUP decoder; ``forward(x) -> B,n_classes,H,W`` logits, or a dict with ``emb``/``fp``."""

    def __init__(self, config: dict[str, Any], pretrained: bool | str | Path = False) -> None:
        super().__init__()
        self.config = config
        self.mean, self.std = tuple(config["mean"]), tuple(config["std"])
        name, n_classes = config["backbone"], int(config["n_classes"])
        try:
            if is_vit(name):
                self.encoder: nn.Module = ViTGrid(name[5:] if name.startswith("timm:") else name, pretrained,
                                                  **config.get("backbone_kwargs", {}))  # fmt: skip
                chans, strides = [self.encoder.channels], [self.encoder.patch]
            else:
                self.encoder = create_backbone(name, pretrained=pretrained, out_indices=(1, 2, 3, 4))
                chans, strides = feature_channels(self.encoder), list(self.encoder.feature_info.reduction())
        except BackboneError as e:
            raise SegmenterError(str(e)) from e
        self.conv_more = _conv(chans[-1], 512)
        skips_c, skips_s = chans[:-1][::-1], strides[:-1][::-1]
        blocks, cin, stride = [], 512, strides[-1]
        self.emb_block = 0
        for i, cout in enumerate(DECODER_CHANNELS):
            skip = skips_c[i] if i < len(skips_c) else 0
            blocks.append(_UpBlock(cin, skip, cout))
            stride = skips_s[i] if i < len(skips_s) else max(1, stride // 2)
            if stride >= 4:
                self.emb_block = i
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.seg_head = nn.Conv2d(DECODER_CHANNELS[-1], n_classes, 3, padding=1)
        emb_c = DECODER_CHANNELS[self.emb_block]
        proj = int(config.get("proj_dim", 64))  # 0: no embedding head (training without the contrasts)
        self.proj = (
            nn.Sequential(
                nn.Conv2d(emb_c, emb_c, 1), nn.BatchNorm2d(emb_c), nn.ReLU(True), nn.Conv2d(emb_c, proj, 1)
            )
            if proj
            else None
        )
        # MPAMatch's image-prototype memory (EMA, one row per class incl. background) and text-prompt parts.
        self.register_buffer("prototypes", torch.zeros(n_classes, proj))
        self.register_buffer("proto_seen", torch.zeros(n_classes, dtype=torch.bool))
        tdim, n_ctx = int(config.get("text_dim", 0)), int(config.get("text_ctx", 0))
        self.text_ctx = nn.Parameter(torch.randn(n_ctx, tdim) * 0.02) if tdim and n_ctx else None
        self.text_proj = nn.Linear(tdim, proj) if tdim else None

    def _decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        skips = feats[:-1][::-1]
        x = self.conv_more(feats[-1])
        emb = x
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
            if i == self.emb_block:
                emb = x
        return self.seg_head(x), emb

    def forward(self, x: torch.Tensor, *, fp: bool = False, with_emb: bool = False) -> Any:
        size = x.shape[-2:]
        feats = self.encoder(x)
        b = x.shape[0]
        if fp:  # UniMatch's feature perturbation: the same maps, half the channels dropped, one pass
            feats = [torch.cat([f, F.dropout2d(f, 0.5, training=True)]) for f in feats]
        logits, emb = self._decode(list(feats))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if not (fp or with_emb):
            return logits
        out = {"logits": logits[:b]}
        if fp:
            out["fp"] = logits[b:]
        if with_emb:
            if self.proj is None:
                raise SegmenterError("this TransUNet was built with proj_dim=0: it has no pixel embeddings")
            out["emb"] = F.normalize(self.proj(emb[:b]), dim=1)
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


def build_transunet(
    n_classes: int,
    backbone: str = "efficientnet_lite0",
    pretrained: bool | str | Path = True,
    *,
    proj_dim: int = 64,
    text_dim: int = 0,
    text_ctx: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> TransUNet:
    """A TransUNet with ``n_classes`` outputs (background included); ``pretrained`` as ``build_segmenter``.

    ``text_dim``/``text_ctx``: the text encoder's width and the number of learnable prompt-context vectors
    (0 = no text parts); ``backbone_kwargs`` go to timm (e.g. UNI: ``{"init_values": 1e-5}``).
    """
    if n_classes < 2:
        raise SegmenterError(f"n_classes counts background too and must be >= 2, got {n_classes}")
    config = {"arch": "transunet", "n_classes": int(n_classes), "backbone": backbone, "proj_dim": int(proj_dim),
              "text_dim": int(text_dim), "text_ctx": int(text_ctx), "backbone_kwargs": dict(backbone_kwargs or {}),
              "mean": list(mean), "std": list(std)}  # fmt: skip
    return TransUNet(config, pretrained=pretrained)


def transunet_from_config(config: dict[str, Any]) -> TransUNet:
    """Rebuild an (untrained) TransUNet from the config a checkpoint stores."""
    return TransUNet(dict(config), pretrained=False)
