"""Tile-encoder registry (timm-style): ``create_encoder(name, checkpoint)`` -> an eval-mode :class:`Encoder`.

Names: the registered ones (``list_encoders()``) plus two open families, ``open_clip:<arch>`` and
``timm:<name>``. Weights come only from local files; nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pbip_engine.engine.embed.encoders.base import (
    Encoder,
    EncoderError,
    EncoderInfo,
    file_sha256,
    load_state_dict_checked,
    read_checkpoint,
    resolve_device,
)
from pbip_engine.engine.embed.encoders.efficientnet import (
    build_efficientnet_lite0,
    efficientnet_lite0_imagenet_state_dict,
)
from pbip_engine.engine.embed.encoders.medclip import build_medclip_vit
from pbip_engine.engine.embed.encoders.open_clip_enc import build_open_clip, check_open_clip_arch
from pbip_engine.engine.embed.encoders.timm_enc import build_timm, check_timm_name

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderError",
    "EncoderInfo",
    "check_encoder_name",
    "create_encoder",
    "efficientnet_lite0_imagenet_state_dict",
    "encoder_id",
    "list_encoders",
    "load_state_dict_checked",
    "read_checkpoint",
    "register_encoder",
    "resolve_device",
]

DEFAULT_ENCODER = "efficientnet_lite0"
_REGISTRY: dict[str, Callable[..., Encoder]] = {}
# prefix families: builder(arch, checkpoint, **kw)
_FAMILIES: dict[str, Callable[..., Encoder]] = {"open_clip": build_open_clip, "timm": build_timm}
_FAMILY_CHECKS: dict[str, Callable[[str], None]] = {
    "open_clip": check_open_clip_arch,
    "timm": check_timm_name,
}
# encoders whose weights ship with an installed package, so checkpoint=None is meaningful
_BUILTIN_WEIGHTS = {"efficientnet_lite0": "imagenet"}


def register_encoder(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator: ``@register_encoder("my_enc") def build(checkpoint=None, **kw) -> Encoder``."""
    if ":" in name:
        raise EncoderError(f"encoder names may not contain ':' (reserved for families): {name!r}")

    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise EncoderError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


register_encoder("efficientnet_lite0")(build_efficientnet_lite0)
register_encoder("medclip_vit")(build_medclip_vit)


def list_encoders() -> list[str]:
    """Registered names (the ``open_clip:<arch>`` / ``timm:<name>`` families are open-ended)."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> EncoderError:
    return EncoderError(
        f"unknown encoder {name!r}; known: {', '.join(list_encoders())}, or the families "
        "'open_clip:<arch>' (e.g. open_clip:ViT-B-16) and 'timm:<name>' (e.g. timm:vit_large_patch16_224)"
    )


def check_encoder_name(name: str) -> None:
    """EncoderError unless ``name`` is registered or names a model of its family (nothing is built).

    Run when a spec is validated: a misspelt name otherwise surfaced as a Ray actor's death in the embed stage.
    """
    if ":" not in name:
        if name not in _REGISTRY:
            raise _unknown(name)
        return
    family, _, arch = name.partition(":")
    if family not in _FAMILIES or not arch:
        raise _unknown(name)
    _FAMILY_CHECKS[family](arch)


def create_encoder(name: str, checkpoint: str | Path | None = None, **kw: object) -> Encoder:
    """Build encoder ``name`` in eval mode with weights from ``checkpoint`` (a local file) or its built-ins."""
    check_encoder_name(name)
    if ":" in name:
        family, _, arch = name.partition(":")
        return _FAMILIES[family](arch, checkpoint, **kw).eval()
    return _REGISTRY[name](checkpoint, **kw).eval()


def encoder_id(name: str, checkpoint: str | Path | None, **kw: object) -> str:
    """Stable id ``name@<weights>[+<kwargs hash>]`` to key embedding datasets and banks.

    ``<weights>`` is the first 12 hex digits of the checkpoint file's sha256, ``imagenet`` for built-in
    weights or ``random`` when a benchmark asked for random init. Kwargs that change the output
    (``random_projection_seed``, ``normalize`` ...) are folded in as a short hash.
    """
    if checkpoint is not None:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise EncoderError(f"checkpoint file not found for encoder {name!r}: {p}")
        weights = file_sha256(p)[:12]
    else:
        weights = _BUILTIN_WEIGHTS.get(name, "random")
    out = f"{name}@{weights}"
    if kw:
        blob = json.dumps(kw, sort_keys=True, default=str).encode()
        out += "+" + hashlib.sha256(blob).hexdigest()[:8]
    return out
