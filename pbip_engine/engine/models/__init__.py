"""Stage-1 models and a small name -> builder registry (timm style).

``create_model("classnet", cfg=..., prototypes=..., k_list=..., n_classes=...)`` builds ClassNet;
backbones are registered too (``create_model("mit_b1", pretrained=path, out_indices=(1, 2, 3, 4))``), so
jobs can name every model in a spec and fail early with the list of known names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .backbones import BackboneError, create_backbone, feature_channels
from .classnet import (
    VARIANTS,
    ClassNet,
    ClassNetConfig,
    ImgMatchNet,
    build_classnet,
    classnet_step,
    freeze_encoder,
    unwrap,
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder under ``name`` (duplicate names are an error, not a silent override)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names raise with the known ones listed."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}")
    return _REGISTRY[name](**kwargs)


register_model("classnet")(build_classnet)
for _bb in ("efficientnet_lite0", "mit_b0", "mit_b1"):
    register_model(_bb)(lambda _n=_bb, **kw: create_backbone(_n, **kw))

__all__ = [
    "VARIANTS",
    "BackboneError",
    "ClassNet",
    "ClassNetConfig",
    "ImgMatchNet",
    "build_classnet",
    "classnet_step",
    "create_backbone",
    "create_model",
    "feature_channels",
    "freeze_encoder",
    "list_models",
    "register_model",
    "unwrap",
]
