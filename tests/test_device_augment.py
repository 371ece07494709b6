"""On-device augmentation: same transforms as the numpy path, masks kept aligned, uint8 in and out."""

from __future__ import annotations

import numpy as np
import torch

from pbip_engine.engine.training.augment import dihedral
from pbip_engine.engine.training.device_augment import (
    colour_jitter,
    dihedral_batch,
    dihedral_tensor,
    random_scaled_crops,
)


def test_dihedral_tensor_matches_numpy() -> None:
    x = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3)
    for k in range(8):
        assert np.array_equal(dihedral_tensor(torch.from_numpy(x), k).numpy(), dihedral(x, k))


def test_dihedral_batch_moves_masks_with_images() -> None:
    img = torch.randint(0, 255, (6, 8, 8, 3), dtype=torch.uint8)
    mask = img[..., 0].clone()
    out, m = dihedral_batch(img, mask, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == img.shape
    assert torch.equal(out[..., 0], m)


def test_random_scaled_crops_shapes_and_alignment() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 255, (h, w, 3), dtype=torch.uint8) for h, w in ((40, 50), (64, 33))]
    masks = [(im[..., 1] > 127).to(torch.uint8) + 1 for im in imgs]
    crops, cm = random_scaled_crops(imgs, masks, 5, 24, (0.75, 2.0), g)
    assert crops.shape == (5, 24, 24, 3) and crops.dtype == torch.uint8
    assert cm.shape == (5, 24, 24) and set(torch.unique(cm).tolist()) <= {1, 2}
    same, sm = random_scaled_crops(imgs, masks, 3, 20, (1.0, 1.0), torch.Generator().manual_seed(1))
    assert torch.equal((same[..., 1] > 127).to(torch.uint8) + 1, sm)  # no resampling at zoom 1


def test_colour_jitter_is_uint8_and_identity_at_zero() -> None:
    img = torch.randint(0, 255, (3, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(colour_jitter(img, 0.0, 0.0, 0.0), img)
    out = colour_jitter(img, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == img.shape
