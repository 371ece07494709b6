"""Stage-2 batches cut from stitched regions: random scaled crops with colour jitter (``segmenter.crop_px``).

The regions (``engine.pseudo.regions``) differ in size, so a Ray Data batch of them cannot be stacked;
this converter decodes each row and draws one crop of ``crop_px`` at a random zoom from it, giving the
fixed-size uint8 batch every ``TrainTask.prepare`` takes. Zoom and colour jitter are the scale and stain
augmentation the tiles never had; the dihedral transform stays the loop's (``LoopConfig.augment``).
Validation rows get the centre crop, no jitter, so the held-out score is comparable between epochs.
The crop and jitter are ``device_augment``'s, which already serve the Ray-free GPU protocol.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pbip_engine.engine.pseudo.regions import IGNORE
from pbip_engine.engine.training.batches import decode_batch, decode_masks
from pbip_engine.engine.training.device_augment import colour_jitter, random_scaled_crops


def pad_to(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``h,w,3`` / ``h,w`` at the bottom-right to at least ``side`` a side: white image, ignored mask."""
    h, w = mask.shape
    if h >= side and w >= side:
        return image, mask
    H, W = max(h, side), max(w, side)
    img = np.full((H, W, 3), 255, np.uint8)
    msk = np.full((H, W), IGNORE, np.uint8)
    img[:h, :w], msk[:h, :w] = image, mask
    return img, msk


def centre_crop(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = pad_to(image, mask, side)
    h, w = mask.shape
    y, x = (h - side) // 2, (w - side) // 2
    return image[y : y + side, x : x + side], mask[y : y + side, x : x + side]


class RegionCrops:
    """Ray Data batch of region rows (``image`` PNG/JPEG bytes, ``mask`` PNG bytes) -> one crop per row."""

    def __init__(self, crop_px: int, zoom: tuple[float, float] = (0.75, 2.0), jitter: float = 0.2,
                 seed: int = 0) -> None:  # fmt: skip
        if crop_px < 16:
            raise ValueError(f"crop_px must be >= 16, got {crop_px}")
        if not 0 < zoom[0] <= zoom[1]:
            raise ValueError(f"zoom must be 0 < min <= max, got {zoom}")
        self.crop_px, self.zoom, self.jitter = int(crop_px), (float(zoom[0]), float(zoom[1])), float(jitter)
        self.generator = torch.Generator().manual_seed(int(seed))
        # the largest source window a crop can cover: pad smaller regions to it (padding is ignored)
        self.min_side = math.ceil(self.crop_px / self.zoom[0])

    def _decode(self, batch: dict[str, Any]) -> tuple[np.ndarray | list, np.ndarray | list, Any]:
        names = batch["tile_id"]
        images = decode_batch({"image": batch["image"], "tile_id": names}, stack=False)["image"]
        return images, decode_masks(batch["mask"], stack=False), names

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, masks, names = self._decode(batch)
        out_i, out_m = [], []
        for img, msk in zip(images, masks, strict=True):
            img, msk = pad_to(img, msk, self.min_side)
            img, msk = (
                torch.from_numpy(np.require(a, requirements="W")) for a in (img, msk)
            )  # PIL: read-only
            ci, cm = random_scaled_crops([img], [msk], 1, self.crop_px, self.zoom, self.generator)
            out_i.append(ci)
            out_m.append(cm)
        image = torch.cat(out_i)
        if self.jitter > 0:
            image = colour_jitter(image, self.jitter, self.jitter, self.jitter, generator=self.generator)
        return {"image": image.numpy(), "mask": torch.cat(out_m).numpy(), "name": names}

    def validation(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, masks, names = self._decode(batch)
        crops = [centre_crop(i, m, self.crop_px) for i, m in zip(images, masks, strict=True)]
        return {
            "image": np.stack([c[0] for c in crops]),
            "mask": np.stack([c[1] for c in crops]),
            "name": names,
        }
