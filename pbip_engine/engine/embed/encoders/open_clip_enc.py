"""``open_clip:<arch>``: the image tower of an OpenCLIP model (PLIP, QuiltNet, CONCH-style ViTs).

The model is built with ``pretrained=None`` (no download) and the user's checkpoint is loaded into the
visual tower. Both whole-model checkpoints (``visual.*`` + text keys) and visual-only ones are accepted.
Only the visual tower is kept in memory; the embedding is what ``encode_image`` returns (unnormalised).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pbip_engine.engine.embed.encoders.base import (
    EncoderError,
    EncoderInfo,
    ModuleEncoder,
    load_state_dict_checked,
    read_checkpoint,
    strip_prefix,
)


def _visual_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = strip_prefix(sd, "module.")
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def _as_tuple3(v: object, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if v is None:
        return default
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    t = tuple(float(x) for x in v)  # type: ignore[union-attr]
    return (t * 3)[:3] if len(t) == 1 else t  # type: ignore[return-value]


def check_open_clip_arch(arch: str) -> None:
    """EncoderError unless ``arch`` is an OpenCLIP architecture this builder takes (the spec's check too)."""
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")):
        raise EncoderError(
            f"open_clip:{arch}: hub/local-dir schemas are not supported; use open_clip:<arch> with "
            "checkpoint=/path/to/open_clip_pytorch_model.bin"
        )
    if arch not in open_clip.list_models():
        raise EncoderError(
            f"unknown OpenCLIP architecture {arch!r}; known: {', '.join(open_clip.list_models()[:12])}, ..."
        )


def build_open_clip(arch: str, checkpoint: str | Path | None = None, **kw: object) -> ModuleEncoder:
    """``open_clip.create_model(arch, pretrained=None, **kw).visual`` + the checkpoint's visual weights.

    ``kw`` go to ``create_model`` (they override the arch config, e.g. ``vision_cfg=...`` for a custom
    tower). ``random_init=True`` skips the checkpoint (benchmarks only).
    """
    import open_clip

    random_init = bool(kw.pop("random_init", False))
    check_open_clip_arch(arch)
    if checkpoint is None and not random_init:
        raise EncoderError(
            f"open_clip:{arch} needs checkpoint=/path/to/weights (e.g. PLIP/QuiltNet's "
            "open_clip_pytorch_model.bin, whole model or visual tower); nothing is downloaded"
        )
    try:
        model = open_clip.create_model(
            arch, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False, **kw
        )
    except Exception as e:  # config errors from deep inside open_clip
        raise EncoderError(f"open_clip:{arch}: could not build the model: {type(e).__name__}: {e}") from e
    visual = model.visual
    if checkpoint is not None:
        load_state_dict_checked(
            visual, _visual_state_dict(read_checkpoint(checkpoint)), source=str(checkpoint)
        )
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = _as_tuple3(cfg.get("mean"), open_clip.OPENAI_DATASET_MEAN)
    std = _as_tuple3(cfg.get("std"), open_clip.OPENAI_DATASET_STD)
    dim = int(getattr(visual, "output_dim", 0) or getattr(model, "embed_dim", 0) or 0)
    if not dim:
        with torch.no_grad():
            dim = int(visual.eval()(torch.zeros(1, 3, size, size)).shape[-1])
    del model  # drop the text tower
    info = EncoderInfo(name=f"open_clip:{arch}", input_size=size, mean=mean, std=std, dim=dim)
    resize = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
    return ModuleEncoder(info, visual, resize=resize)
