"""The batch convention every trainer and predictor shares, and the conversions to model input.

Loaders yield dicts with ``image`` = uint8 RGB ``B,H,W,3`` (numpy or tensor), plus ``labels`` (multi-hot
``B,N``) and/or ``mask`` (``B,H,W``; 0 = background, k = class k, 255 = ignore). Images travel as uint8
(1 byte/px) and are normalised on the device; a float ``B,3,H,W`` image is taken as already normalised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers (state dicts and attributes live there)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def as_tensor(value: Any) -> torch.Tensor:
    return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))


def to_model_input(
    batch: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """uint8 ``B,H,W,3`` (or normalised float ``B,3,H,W``) + labels -> normalised float tensors on ``device``."""
    if "image" not in batch:
        raise KeyError(f"batch has no 'image' key (keys: {sorted(batch)})")
    img = as_tensor(batch["image"])
    dev = torch.device(device)
    if img.dtype == torch.uint8:
        if img.ndim == 3:
            img = img.unsqueeze(0)
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"uint8 images must be B,H,W,3 RGB, got shape {tuple(img.shape)}")
        img = img.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        img = (img - m) / s
    elif img.is_floating_point():
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"float images must be normalised B,3,H,W, got shape {tuple(img.shape)}")
        img = img.to(dev, non_blocking=True).float()
    else:
        raise ValueError(f"image must be uint8 B,H,W,3 or float B,3,H,W, got dtype {img.dtype}")
    out = {"image": img}
    if "labels" in batch:
        out["labels"] = as_tensor(batch["labels"]).to(dev).float()
    return out


def rgb_uint8(batch: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The batch's images as uint8 ``B,H,W,3`` RGB (denormalising float input)."""
    img = batch["image"]
    arr = img.detach().cpu() if torch.is_tensor(img) else torch.as_tensor(np.asarray(img))
    if arr.dtype == torch.uint8:
        return arr.numpy() if arr.ndim == 4 else arr.numpy()[None]
    x = arr.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
