"""``timm:<name>``: any timm backbone, pooled (``num_classes=0``), weights from a local checkpoint.

UNI, for example, is ``create_encoder("timm:vit_large_patch16_224", checkpoint=".../pytorch_model.bin",
init_values=1e-5, dynamic_img_size=True)``; the kwargs go to ``timm.create_model``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import timm.data

from pbip_engine.engine.embed.encoders.base import (
    EncoderError,
    EncoderInfo,
    ModuleEncoder,
    load_state_dict_checked,
    read_checkpoint,
    strip_prefix,
)

_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head.fc.")


def check_timm_name(name: str) -> None:
    """EncoderError unless timm knows model ``name`` (the spec's check and the builder's)."""
    if not timm.is_model(name):
        raise EncoderError(f"unknown timm model {name!r} (see timm.list_models('*pattern*'))")


def build_timm(name: str, checkpoint: str | Path | None = None, **kw: object) -> ModuleEncoder:
    """Pooled timm features; ``random_init=True`` skips the checkpoint (benchmarks only)."""
    random_init = bool(kw.pop("random_init", False))
    check_timm_name(name)
    if checkpoint is None and not random_init:
        raise EncoderError(
            f"timm:{name} needs checkpoint=/path/to/pytorch_model.bin or .safetensors (e.g. UNI's "
            "weights); pretrained weights are never downloaded"
        )
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    except Exception as e:
        raise EncoderError(f"timm:{name}: could not build the model: {type(e).__name__}: {e}") from e
    if checkpoint is not None:
        sd = strip_prefix(read_checkpoint(checkpoint), "module.")
        own = backbone.state_dict()
        # classifier weights are expected in full checkpoints; drop them silently when the model has none
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
        load_state_dict_checked(backbone, sd, source=str(checkpoint))
    cfg = timm.data.resolve_data_config({}, model=backbone)
    size = kw.get("img_size") or cfg["input_size"][-1]  # img_size overrides the pretrained cfg's size
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    # pooled output width: head_hidden_size where a model has a pre-logits layer, else num_features
    dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    info = EncoderInfo(
        name=f"timm:{name}",
        input_size=size,
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        dim=dim,
    )
    resize = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
    return ModuleEncoder(info, backbone, resize=resize)
