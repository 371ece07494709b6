"""Cross-entropy plus soft Dice (``segmenter.loss: ce_dice``), the usual pairing in medical segmentation
(nnU-Net, MONAI's ``DiceCELoss``).

Cross-entropy scores every pixel alike, so the class that covers more of a crop dominates its gradient; the
Dice term scores each class by its overlap with the label, the quantity mIoU measures, whatever its area.
Kornia's ``dice_loss`` (``average="macro"``) computes it per image over the classes present in the image's
labelled pixels, skipping ``ignore_index``; the class weights stay on the cross-entropy term.
"""

from __future__ import annotations

import torch
from kornia.losses import dice_loss

from pbip_engine.engine.metrics import IGNORE_INDEX


def ce_dice_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``CE + dice_weight * (1 - macro soft Dice)`` over the non-ignored pixels of ``logits`` (B,N,H,W)
    against ``mask`` (B,H,W); 0 (with a graph) when every pixel is ignored."""
    from pbip_engine.engine.training.segmentation import segmentation_loss

    ce = segmentation_loss(logits, mask, ignore_index=ignore_index, weight=class_weights)
    # kornia scores an all-ignored image 1; the flag zeroes it on the device (segmentation_loss already paid the
    # one host sync of the step for the same question)
    labelled = (mask != ignore_index).any()
    dice = dice_loss(logits.float(), mask, average="macro", ignore_index=ignore_index)
    return ce + float(dice_weight) * dice * labelled
