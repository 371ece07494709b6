"""Per-sample dihedral augmentation (flips and 90° rotations) of uint8 batches, masks moved alongside.

Histology has no canonical orientation, so each of the 8 symmetries of the square is as likely as the
tile itself. Each sample draws its own transform (a whole batch sharing one flip teaches nothing new
within the batch). Written with numpy views rather than albumentations/kornia: the 8 dihedral maps of a
square are exact index permutations, need no interpolation, and stay on uint8 data before the device
copy; richer photometric/scale augmentation belongs to a library when it is added.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k``-th (0..7) symmetry of the square applied to an ``H,W[,C]`` array: rot90^(k%4), then a flip if k>=4."""
    y = np.rot90(x, k=k % 4, axes=(0, 1))
    return y[:, ::-1] if k >= 4 else y


def augment_batch(batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A random dihedral transform per sample of ``image`` (``B,H,W,3``) and, identically, of ``mask`` (``B,H,W``).

    Square tiles keep their shape under rotation; a non-square batch only gets flips (rotating would
    change H and W per sample, which a stacked batch cannot hold).
    """
    img = np.asarray(batch["image"])
    square = img.shape[1] == img.shape[2]
    ks = rng.integers(0, 8 if square else 4, size=len(img))
    if not square:
        ks = np.array([0, 2, 4, 6])[ks]  # identity, rot180, flip, rot180+flip
    out = dict(batch)
    out["image"] = np.stack([dihedral(im, int(k)) for im, k in zip(img, ks, strict=True)])
    if "mask" in batch:
        mask = np.asarray(batch["mask"])
        out["mask"] = np.stack([dihedral(m, int(k)) for m, k in zip(mask, ks, strict=True)])
    return out
