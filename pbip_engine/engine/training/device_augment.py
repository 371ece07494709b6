"""Augmentation of uint8 batches that already live on the device (GPU runs that keep the data set there).

The numpy path (``augment.augment_batch``) copies every batch from the host; when a whole data set sits
on the accelerator as uint8 tensors, these do the same jobs there: per-sample dihedral transforms, random
scaled crops of whole images (with their masks) and photometric jitter. Everything stays uint8
``B,H,W,3`` (masks ``B,H,W``) so the result feeds ``TrainTask.prepare`` like any loader batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def dihedral_tensor(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th (0..7) symmetry of the square on the two spatial axes of ``H,W[,C]`` (as ``augment.dihedral``)."""
    y = torch.rot90(x, k % 4, dims=(0, 1))
    return y.flip(1) if k >= 4 else y


def dihedral_batch(
    images: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random dihedral transform per sample of square ``B,H,W,3`` images and, identically, ``B,H,W`` masks."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral_batch needs square images, got {tuple(images.shape)}")
    ks = torch.randint(0, 8, (len(images),), generator=generator).tolist()
    out = torch.stack([dihedral_tensor(im, k) for im, k in zip(images, ks, strict=True)])
    if masks is None:
        return out, None
    return out, torch.stack([dihedral_tensor(m, k) for m, k in zip(masks, ks, strict=True)])


def random_scaled_crops(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    n: int,
    crop: int,
    scale: tuple[float, float] = (0.75, 2.0),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``crop``-px crops of random images at a random zoom in ``scale`` (> 1 magnifies).

    ``images``: uint8 ``H,W,3`` tensors (sizes may differ), ``masks``: ``H,W`` uint8 of the same sizes.
    A crop covers ``crop / s`` source pixels (clamped to the image), resized bilinearly (masks: nearest).
    Returns uint8 ``n,crop,crop,3`` and ``n,crop,crop``.
    """
    if len(images) != len(masks) or not images:
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    lo, hi = scale
    idx = torch.randint(0, len(images), (n,), generator=generator).tolist()
    u = torch.rand(n, 3, generator=generator).tolist()
    out_i, out_m = [], []
    for i, (us, uy, ux) in zip(idx, u, strict=True):
        img, msk = images[i], masks[i]
        h, w = img.shape[:2]
        s = lo + (hi - lo) * us
        side = max(1, min(round(crop / s), h, w))
        y0, x0 = int(uy * (h - side + 1)), int(ux * (w - side + 1))
        pi = img[y0 : y0 + side, x0 : x0 + side].permute(2, 0, 1)[None].float()
        pm = msk[y0 : y0 + side, x0 : x0 + side][None, None].float()
        if side != crop:
            pi = F.interpolate(pi, size=(crop, crop), mode="bilinear", align_corners=False)
            pm = F.interpolate(pm, size=(crop, crop), mode="nearest")
        out_i.append(pi[0])
        out_m.append(pm[0, 0])
    imgs = torch.stack(out_i).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return imgs.contiguous(), torch.stack(out_m).to(torch.uint8)


def colour_jitter(
    images: torch.Tensor,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors in ``1 ± amount`` on uint8 ``B,H,W,3``."""
    b = len(images)
    dev = images.device

    def factor(a: float) -> torch.Tensor:
        return (1 + a * (2 * torch.rand(b, generator=generator) - 1)).to(dev).view(b, 1, 1, 1)

    x = images.float()
    x = x * factor(brightness)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor(contrast) + mean
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=dev)).sum(-1, keepdim=True)
    x = (x - grey) * factor(saturation) + grey
    return x.round_().clamp_(0, 255).to(torch.uint8)
