"""Purified Labels Filtration (gland paper, Eq. 10-11): a stage-2 loss that down-weights noisy pseudo labels.

Per image with more than one class in its label map, every labelled pixel's cross-entropy is weighted by

* a loss weight: the spatial softmax of ``-CE`` over the image's labelled pixels, divided by its mean
  (the paper, following OEEM) or by its max - min (``normalize="range"``, the wsss_gland code), so easy
  pixels (low loss, likely clean) count more than hard ones (likely noise);
* a confidence: max - min of the class softmax at that pixel (the paper; ``confidence="max"``: the top
  probability only, as in the code), so pixels the network is sure about count more; ``confidence="none"``
  keeps the loss weight alone, which is OEEM's loss (Li et al., MICCAI 2022), the one PLF was derived from.

Both weights are detached: they choose which pixels teach, they are not optimised. Images with a single
class keep weight 1 (filtering inside a one-class image would only add noise). Ignored pixels
(``ignore_index``) count nowhere. The result is the mean weighted CE over labelled pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pbip_engine.engine.metrics import IGNORE_INDEX

Normalize = Literal["mean", "range"]
Confidence = Literal["max_minus_min", "max", "none"]


def plf_weights(
    logits: torch.Tensor,
    mask: torch.Tensor,
    ce: torch.Tensor,
    *,
    normalize: Normalize = "mean",
    confidence: Confidence = "max_minus_min",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``B,H,W`` pixel weights (detached) for the per-pixel CE ``ce``; 0 on ignored pixels."""
    with torch.no_grad():
        b = mask.shape[0]
        valid = (mask != ignore_index).flatten(1)  # B,P
        neg = (-ce.detach().float()).flatten(1).masked_fill(~valid, float("-inf"))
        w = torch.softmax(neg, 1).nan_to_num(0.0)  # an all-ignored image: -inf everywhere -> nan -> 0
        if normalize == "mean":
            n = valid.sum(1, keepdim=True).clamp_min(1)
            w = w / (w.sum(1, keepdim=True) / n).clamp_min(1e-12)
        else:
            hi = w.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
            lo = w.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
            w = w / (hi - lo).clamp_min(1e-12)
        if confidence != "none":
            prob = torch.softmax(logits.detach().float(), 1).flatten(2)  # B,N,P
            w = w * (prob.amax(1) - prob.amin(1) if confidence == "max_minus_min" else prob.amax(1))
        multi = torch.tensor([int(torch.unique(m[m != ignore_index]).numel()) > 1 for m in mask],
                             device=w.device)  # fmt: skip
        w = torch.where(multi[:, None], w, torch.ones_like(w))
        return (w * valid).view(b, *mask.shape[1:])


def plf_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: Normalize = "mean",
    confidence: Confidence = "max_minus_min",
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 11: the PLF-weighted pixel CE, averaged over the labelled pixels (0 with a graph if there are none).

    ``class_weights`` (one per class) multiply each pixel's term by its target's weight after PLF has chosen
    its weights from the unweighted CE, so class balance and label purification stay separate.
    """
    logits = logits.float()
    valid = mask != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, mask, ignore_index=ignore_index, reduction="none")  # Eq. 10 per pixel
    w = plf_weights(logits, mask, ce, normalize=normalize, confidence=confidence, ignore_index=ignore_index)
    if class_weights is not None:
        w = w * class_weights.to(logits.device, torch.float32)[mask.masked_fill(~valid, 0)]
    return (ce * w).sum() / valid.sum()
