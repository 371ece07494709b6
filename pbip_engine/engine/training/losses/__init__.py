"""Stage-2 losses any method can choose (spec ``segmenter.loss``; a method's default in ``Stage2Defaults``).

``stage2_loss(name, options)`` returns ``loss(logits B,N,H,W, mask B,H,W) -> scalar``; ``ce`` is the plain
pixel cross-entropy of ``engine.training.segmentation``, ``ce_dice`` cross-entropy plus soft Dice, ``plf`` the
gland paper's Purified Labels Filtration. Each takes per-class weights (``class_weights``, background first;
``class_weights.py`` derives them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.training.losses.class_weights import balanced_weights, mask_class_counts
from pbip_engine.engine.training.losses.dice import ce_dice_loss
from pbip_engine.engine.training.losses.plf import plf_loss, plf_weights

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
STAGE2_LOSSES = ("ce", "ce_dice", "plf")


def stage2_loss(
    name: str,
    options: Mapping[str, Any] | None = None,
    ignore_index: int = IGNORE_INDEX,
    class_weights: Sequence[float] | None = None,
) -> LossFn:
    """The stage-2 loss ``name`` with its options (``plf``: ``normalize``, ``confidence``; ``ce_dice``:
    ``dice_weight``) and optional per-class weights (one per mask value 0..N)."""
    w = None if class_weights is None else torch.tensor([float(x) for x in class_weights])
    if name == "ce":
        from pbip_engine.engine.training.segmentation import segmentation_loss

        return partial(segmentation_loss, ignore_index=ignore_index, weight=w)
    if name == "ce_dice":
        return partial(ce_dice_loss, ignore_index=ignore_index, class_weights=w, **dict(options or {}))
    if name == "plf":
        return partial(plf_loss, ignore_index=ignore_index, class_weights=w, **dict(options or {}))
    raise ValueError(f"unknown stage-2 loss {name!r}; losses are {list(STAGE2_LOSSES)}")


__all__ = [
    "STAGE2_LOSSES",
    "LossFn",
    "balanced_weights",
    "ce_dice_loss",
    "mask_class_counts",
    "plf_loss",
    "plf_weights",
    "stage2_loss",
]
