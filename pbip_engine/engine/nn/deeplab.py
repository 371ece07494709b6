"""Stage-2 segmenters: DeepLab-v2 (the paper's "unmodified Deeplab-v2") and DeepLab-v3+ on timm backbones.

PBIP trains a fully supervised segmenter on the stage-1 pseudo masks (paper §4, "an unmodified
Deeplab-v2 model"); the public code (QingchenTang/PBIP @ 6d40540) has no stage 2. Both heads here follow the
original papers:

* DeepLab-v2 (Chen et al., TPAMI 2017): ASPP-L = four parallel 3x3 convolutions with dilation 6/12/18/24
  straight to class logits, **summed**, on the deepest feature map at output stride 8 (the paper's
  setting; 16 is allowed for speed).
* DeepLab-v3+ (Chen et al., ECCV 2018): ASPP (1x1, three atrous 3x3 at 6/12/18 for OS 16, doubled for
  OS 8, image pooling) -> 1x1 projection, then a decoder fusing the stride-4 features (48-channel 1x1)
  with two 3x3 convolutions. This is the MLPS stage 2 (ChuHan89/WSSS-Tissue @ f006972). The paper makes the
  atrous and decoder 3x3 convolutions depthwise separable (its §3.2; mmsegmentation's
  ``DepthwiseSeparableASPPHead``, smp's ``DeepLabV3Plus``): ``separable=True``, the default. The dense
  variant (``separable=False``, checkpoints from before the option) spends ~70 % of a 192-px training
  step in its head, most of it in the stride-4 decoder; separable, the step is 2.0x faster on the 2-core
  CPU (``bench/bench_segmenter_step.py``).

Both papers' rates assume crops of 321-513 px. Stage 2 here trains on tiles of ~100 px, where a 12-px
feature map leaves the large-rate taps on zero padding only: ``build_segmenter(crop_px=...)`` shrinks the
rates to the crop (``fit_rates``) and ``model.config["aspp_rates"]`` keeps them for the checkpoint.

``forward`` returns logits ``[B, n_classes, H, W]`` upsampled (bilinear) to the input size, with
``n_classes`` *including* background 0. The module carries ``config`` (everything needed to rebuild it
from a checkpoint) and the normalisation its backbone expects (``mean``/``std`` in RGB order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.nn.backbones import BackboneError, create_backbone, feature_channels
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD

ARCHS = ("deeplabv2", "deeplabv3plus")
DEFAULT_OUTPUT_STRIDE = {"deeplabv2": 8, "deeplabv3plus": 16}
V2_RATES = (6, 12, 18, 24)
V3_RATES_OS16 = (6, 12, 18)


class SegmenterError(ValueError):
    """Unknown architecture, impossible configuration, or a checkpoint that does not fit."""


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _sep_conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """Atrous separable 3x3: depthwise (dilated) + BN + ReLU, then pointwise + BN + ReLU (DeepLab-v3+ §3.2)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        *_conv_bn_relu(cin, cout, 1),
    )


def _conv3x3(cin: int, cout: int, dilation: int, separable: bool) -> nn.Sequential:
    return _sep_conv_bn_relu(cin, cout, dilation) if separable else _conv_bn_relu(cin, cout, 3, dilation)


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP-L: one dilated 3x3 conv per rate straight to class logits, outputs summed."""

    def __init__(self, cin: int, n_classes: int, rates: Sequence[int] = V2_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(cin, n_classes, 3, padding=r, dilation=r) for r in rates)
        for b in self.branches:  # v2 initialises the classifier with N(0, 0.01)
            nn.init.normal_(b.weight, 0.0, 0.01)
            nn.init.zeros_(b.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


class _ImagePooling(nn.Module):
    """ASPP image-level branch. No BatchNorm: a 1x1 pooled map would make BN fail at batch size 1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class ASPPv3(nn.Module):
    """DeepLab-v3 ASPP: 1x1 + atrous 3x3 branches + image pooling, concatenated and projected."""

    def __init__(
        self,
        cin: int,
        cout: int = 256,
        rates: Sequence[int] = V3_RATES_OS16,
        dropout: float = 0.1,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [
                _conv_bn_relu(cin, cout, 1),
                *(_conv3x3(cin, cout, r, separable) for r in rates),
                _ImagePooling(cin, cout),
            ]
        )
        self.project = nn.Sequential(_conv_bn_relu(cout * len(self.branches), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLab(nn.Module):
    """Backbone + DeepLab head; ``forward(x) -> [B, n_classes, H, W]`` logits at the input size."""

    def __init__(
        self,
        backbone: nn.Module,
        head: str,
        n_classes: int,
        *,
        rates: Sequence[int],
        config: dict,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_type = head
        self.config = config
        self.mean = tuple(config["mean"])
        self.std = tuple(config["std"])
        chans = feature_channels(backbone)
        if head == "deeplabv2":
            self.aspp: nn.Module = ASPPv2(chans[-1], n_classes, rates)
            self.decoder = None
        else:
            self.aspp = ASPPv3(chans[-1], 256, rates, separable=separable)
            self.low_proj = _conv_bn_relu(chans[0], 48, 1)
            self.decoder = nn.Sequential(
                _conv3x3(256 + 48, 256, 1, separable),
                _conv3x3(256, 256, 1, separable),
                nn.Conv2d(256, n_classes, 1),
            )

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained from scratch (DeepLab gives them a 10x learning rate)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = self.backbone(x)
        if self.decoder is None:
            logits = self.aspp(feats[-1])
        else:
            low = self.low_proj(feats[0])
            high = F.interpolate(
                self.aspp(feats[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False
            )
            logits = self.decoder(torch.cat([high, low], dim=1))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def paper_rates(arch: str, output_stride: int) -> tuple[int, ...]:
    """The papers' ASPP rates, rescaled from their output stride so the field of view stays the same in pixels."""
    if arch == "deeplabv2":
        return tuple(max(1, r * 8 // output_stride) for r in V2_RATES)
    return tuple(max(1, r * 16 // output_stride) for r in V3_RATES_OS16)


def fit_rates(rates: Sequence[int], feature_px: int) -> tuple[int, ...]:
    """Shrink ASPP ``rates`` so every branch learns on a ``feature_px``-wide map.

    A 3x3 tap at offset ``r`` lands inside the map for ``feature_px - r`` of the ``feature_px`` positions
    along an axis; at ``r >= feature_px`` it only ever sees zero padding, gets no gradient and keeps its
    random initialisation, which then adds noise when the model predicts on larger tiles. Capping the largest
    rate at ``feature_px // 2`` lets each off-centre tap learn from at least half the positions. The set is
    scaled proportionally (its ratios are the papers' design) and kept distinct where the cap allows.
    """
    if not rates:
        return ()
    limit = max(1, int(feature_px) // 2)
    ordered = sorted(int(r) for r in rates)
    top = ordered[-1]
    if top <= limit:
        return tuple(ordered)
    out = [max(1, int(r * limit / top + 0.5)) for r in ordered]
    if limit >= len(out):
        for i in range(1, len(out)):
            out[i] = max(out[i], out[i - 1] + 1)
        out = [min(r, limit - (len(out) - 1 - i)) for i, r in enumerate(out)]
    return tuple(out)


def build_segmenter(
    arch: str = "deeplabv2",
    n_classes: int = 5,
    backbone: str = "efficientnet_lite0",
    pretrained: bool | str | Path = True,
    *,
    output_stride: int | None = None,
    crop_px: int | None = None,
    aspp_rates: Sequence[int] | None = None,
    separable: bool = True,
) -> DeepLab:
    """A DeepLab segmenter with ``n_classes`` outputs (background 0 included).

    ``pretrained``: True = offline ImageNet weights where the backbone has them (efficientnet_lite0),
    a path = a backbone checkpoint (e.g. torchvision/timm ResNet-101 ``.pth``; missing/unexpected keys
    are logged and kept in ``model.backbone.load_report``, shape mismatches raise naming the tensor),
    False = random init. ``output_stride`` defaults to 8 for DeepLab-v2 (as in its paper) and 16 for v3+.

    ``crop_px``: the training crop. The papers' rates assume crops of ~320-512 px; on a 96-px crop at
    output stride 8 the feature map is 12 px and the 12/18/24 branches never learn (``fit_rates``). Given
    the crop, the rates are shrunk to fit it; without it the papers' rates are kept. ``aspp_rates`` sets
    the rates outright (``segmenter_from_config`` uses it to rebuild a checkpoint's model). The rates in
    use are recorded in ``model.config["aspp_rates"]``.

    ``separable``: DeepLab-v3+'s atrous and decoder 3x3 convolutions depthwise separable, as in its paper
    (ignored by v2, whose ASPP maps straight to class logits). Recorded in ``model.config["separable"]``.
    """
    if arch not in ARCHS:
        raise SegmenterError(f"unknown segmenter arch {arch!r}; choose from {ARCHS}")
    if n_classes < 2:
        raise SegmenterError(f"n_classes counts background too and must be >= 2, got {n_classes}")
    os_ = DEFAULT_OUTPUT_STRIDE[arch] if output_stride is None else int(output_stride)
    if os_ not in (8, 16, 32):
        raise SegmenterError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    out_indices = (4,) if arch == "deeplabv2" else (1, 4)
    kwargs: dict[str, Any] = {}
    if os_ != 32:
        kwargs["output_stride"] = os_
    try:
        bb = create_backbone(backbone, pretrained=pretrained, out_indices=out_indices, **kwargs)
    except TypeError as e:  # backbones without dilation support (e.g. MiT) reject output_stride
        raise SegmenterError(f"backbone {backbone!r} does not support output_stride={os_}: {e}") from e
    except BackboneError as e:
        raise SegmenterError(str(e)) from e
    reductions = list(bb.feature_info.reduction())
    if arch == "deeplabv3plus" and reductions[0] != 4:
        raise SegmenterError(
            f"backbone {backbone!r}: DeepLab-v3+ needs stride-4 low-level features, got {reductions}"
        )
    if aspp_rates is not None:
        rates = tuple(int(r) for r in aspp_rates)
        if not rates or min(rates) < 1:
            raise SegmenterError(f"aspp_rates must be a non-empty list of rates >= 1, got {aspp_rates}")
    elif crop_px is not None:
        rates = fit_rates(paper_rates(arch, os_), math.ceil(int(crop_px) / os_))
    else:
        rates = paper_rates(arch, os_)
    config = {
        "arch": arch,
        "n_classes": int(n_classes),
        "backbone": backbone,
        "output_stride": os_,
        "aspp_rates": list(rates),
        "separable": bool(separable) and arch == "deeplabv3plus",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    return DeepLab(bb, arch, n_classes, rates=rates, config=config, separable=config["separable"])


def segmenter_from_config(config: dict) -> DeepLab:
    """Rebuild an (untrained) segmenter from ``model.config`` as stored in a checkpoint."""
    missing = [k for k in ("arch", "n_classes", "backbone") if k not in config]
    if missing:
        raise SegmenterError(f"segmenter config lacks {missing}: {config}")
    if config["arch"] == "transunet":  # the semi-supervised methods' segmenter (engine/nn/transunet.py)
        from pbip_engine.engine.nn.transunet import transunet_from_config

        return transunet_from_config(config)  # type: ignore[return-value]
    model = build_segmenter(
        config["arch"],
        int(config["n_classes"]),
        config["backbone"],
        pretrained=False,
        output_stride=config.get("output_stride"),
        aspp_rates=config.get("aspp_rates"),  # absent in older checkpoints: the papers' rates
        separable=bool(config.get("separable", False)),  # absent in older checkpoints: the dense head
    )
    for k in ("mean", "std"):
        if k in config:
            model.config[k] = list(config[k])
    model.mean, model.std = tuple(model.config["mean"]), tuple(model.config["std"])
    return model
