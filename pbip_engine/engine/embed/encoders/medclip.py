"""MedCLIP's vision tower as PBIP uses it: Swin-T (pooled 768-d) + ``projection_head`` Linear(768 -> 512, no bias).

MedCLIP checkpoints (``pytorch_model.bin``) store the tower with HF-transformers Swin names under
``vision_model.model.*`` and the projection as ``vision_model.projection_head.weight``. timm's own Swin
``checkpoint_filter_fn`` only knows the original Microsoft layout, so the HF -> timm renaming is done here:
q/k/v are concatenated into ``qkv`` and each stage's trailing ``downsample`` moves to the start of the
next stage (HF/original merge at the end of stage i, timm at the start of stage i+1; the 2x2 patch
concatenation order is the same in both).

Code-faithful option: the public PBIP code never loaded MedCLIP weights (ImageNet Swin + random projection,
QingchenTang/PBIP @ 6d40540). ``random_projection_seed=s`` reproduces that *kind* of model from an explicit Swin checkpoint;
the exact projection of the shipped bank cannot be reproduced (it depends on the global RNG stream).
"""

from __future__ import annotations

import re
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

ARCH = "swin_tiny_patch4_window7_224"
PROJ_KEY = "projection_head.weight"
# MedCLIP's constants.IMG_MEAN / IMG_STD (grey chest X-ray statistics, repeated over RGB)
MEDCLIP_MEAN = (0.5862785803043838,) * 3
MEDCLIP_STD = (0.27950088968644304,) * 3
# BCSS-WSSS statistics as the PBIP code applies them: to cv2 BGR images (QingchenTang/PBIP @ 6d40540)
BCSS_MEAN_BGR = (0.66791496, 0.47791372, 0.70623304)
BCSS_STD_BGR = (0.1736589, 0.22564577, 0.19820057)

_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
}


def is_hf_swin(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(
        k.startswith("embeddings.patch_embeddings") or k.startswith("encoder.layers.") for k in state_dict
    )


def hf_swin_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF-transformers ``SwinModel`` state dict to timm ``SwinTransformer`` names.

    Buffers that timm rebuilds (``relative_position_index``, attention masks) are dropped; unknown keys are
    kept unchanged so the loader reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if k.endswith("relative_position_index") or "attn_mask" in k:
            continue
        if k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
            continue
        if k.startswith("embeddings.norm."):
            out["patch_embed.norm." + k.rsplit(".", 1)[1]] = v
            continue
        if k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.downsample\.(.+)$", k)
        if m:
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
        if m:
            prefix = f"layers.{m.group(1)}.blocks.{m.group(2)}"
            rest = m.group(3)
            q = re.match(r"attention\.self\.(query|key|value)\.(weight|bias)$", rest)
            if q:
                qkv.setdefault(f"{prefix}.attn.qkv.{q.group(2)}", {})[q.group(1)] = v
                continue
            for hf, tm in _HF_BLOCK.items():
                if rest == hf or rest.startswith(hf + "."):
                    out[f"{prefix}.{tm}{rest[len(hf) :]}"] = v
                    break
            else:
                out[k] = v
            continue
        out[k] = v
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise EncoderError(f"HF Swin checkpoint has an incomplete q/k/v set for {key}: {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def timm_swin_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_swin_to_timm` (used by tests to fabricate MedCLIP-style checkpoints)."""
    inv = {v: k for k, v in _HF_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith("relative_position_index") or "attn_mask" in k:
            continue
        if k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("patch_embed.norm."):
            out["embeddings.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.rsplit(".", 1)[1]] = v
        elif m := re.match(r"layers\.(\d+)\.downsample\.(.+)$", k):
            out[f"encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = v
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
            prefix = f"encoder.layers.{m.group(1)}.blocks.{m.group(2)}"
            rest = m.group(3)
            if rest.startswith("attn.qkv."):
                for name, part in zip(("query", "key", "value"), v.chunk(3, 0), strict=True):
                    out[f"{prefix}.attention.self.{name}.{rest.rsplit('.', 1)[1]}"] = part.clone()
                continue
            for tm, hf in inv.items():
                if rest == tm or rest.startswith(tm + "."):
                    out[f"{prefix}.{hf}{rest[len(tm) :]}"] = v
                    break
        else:
            out[k] = v
    return out


def _split_medclip(
    sd: dict[str, torch.Tensor], backbone: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """-> (Swin tensors with timm names, projection weight or None) from any supported layout."""
    sd = strip_prefix(sd, "module.")
    proj = None
    for key in ("vision_model." + PROJ_KEY, PROJ_KEY):
        if key in sd:
            proj = sd[key]
    tower = {k: v for k, v in sd.items() if not k.endswith(PROJ_KEY)}
    if any(k.startswith("vision_model.") for k in tower):  # full MedCLIP: drop text tower / logit scale
        tower = {k[len("vision_model.") :]: v for k, v in tower.items() if k.startswith("vision_model.")}
    for prefix in ("model.", "swin."):
        if tower and all(k.startswith(prefix) for k in tower if not k.startswith("classifier.")):
            tower = {k[len(prefix) :]: v for k, v in tower.items() if k.startswith(prefix)}
    if is_hf_swin(tower):
        tower = hf_swin_to_timm(tower)
    elif "layers.0.downsample.reduction.weight" in tower:  # original Microsoft layout: timm converts it
        from timm.models.swin_transformer import checkpoint_filter_fn

        tower = checkpoint_filter_fn(tower, backbone)
    tower = {k: v for k, v in tower.items() if not (k.startswith("head.") or k.startswith("classifier."))}
    return tower, proj


def build_medclip_vit(
    checkpoint: str | Path | None = None,
    *,
    random_projection_seed: int | None = None,
    normalize: str = "medclip",
    **kw: object,
) -> ModuleEncoder:
    """Swin-T + 768->512 projection from a MedCLIP (or Swin) checkpoint file.

    ``normalize``: ``"medclip"`` (MedCLIP's grey statistics), ``"imagenet"``, or ``"pbip_code"`` (what the
    public PBIP code fed the tower: BGR channels, BCSS BGR statistics, then per-tile global min-max).
    """
    if checkpoint is None:
        raise EncoderError(
            "medclip_vit needs checkpoint=/path/to/pytorch_model.bin (MedCLIP's vision weights, "
            "keys vision_model.model.* + vision_model.projection_head.weight). For the PBIP code's "
            "behaviour (ImageNet Swin-T + random projection) pass checkpoint=/path/to/swin_tiny weights "
            "and random_projection_seed=<int>. Nothing is downloaded."
        )
    backbone = timm.create_model(ARCH, pretrained=False, num_classes=0, **kw)
    tower, proj_w = _split_medclip(read_checkpoint(checkpoint), backbone)
    load_state_dict_checked(backbone, tower, source=str(checkpoint))
    projection = torch.nn.Linear(backbone.num_features, 512, bias=False)
    if random_projection_seed is not None:
        if proj_w is not None:
            raise EncoderError(
                f"{checkpoint} already has a projection_head; random_projection_seed is only for plain "
                "Swin checkpoints (the PBIP-code mode)"
            )
        gen = torch.Generator().manual_seed(int(random_projection_seed))
        bound = 1.0 / backbone.num_features**0.5  # nn.Linear's default kaiming-uniform bound
        with torch.no_grad():
            projection.weight.copy_(torch.rand(projection.weight.shape, generator=gen) * 2 * bound - bound)
    elif proj_w is None:
        raise EncoderError(
            f"{checkpoint} has no projection_head.weight (not a MedCLIP checkpoint?); pass "
            "random_projection_seed=<int> to use a seeded random 768->512 projection as the PBIP code did"
        )
    else:
        load_state_dict_checked(projection, {"weight": proj_w}, source=f"{checkpoint} (projection_head)")
    pp: dict[str, object] = {}
    if normalize == "medclip":
        mean, std = MEDCLIP_MEAN, MEDCLIP_STD
    elif normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "pbip_code":
        mean, std = BCSS_MEAN_BGR, BCSS_STD_BGR  # applied to BGR channels, as in the code
        pp = {"channel_order": "bgr", "minmax": True}
    else:
        raise EncoderError(f"medclip_vit: normalize must be medclip|imagenet|pbip_code, got {normalize!r}")
    info = EncoderInfo(name="medclip_vit", input_size=224, mean=mean, std=std, dim=512)
    return ModuleEncoder(info, backbone, projection, **pp)
