"""LPD's own losses as pure tensor functions (paper §2.2-2.3), so they test without a model.

* ``class_regions``:   Omega_c, the locations the fused CAM assigns to class c (no gradient)
* ``diversity_loss``:  the Prototype Diversity Regulariser, Eq. 3-5
* ``infonce_losses``:  l_fg + l_bg of the mask refiner (InfoNCE, one shared temperature)

The public code's diversity loss has two bugs that these functions are written (and tested) against
(tom1209-netizen/LPD @ b241f83): it applied a second softmax to distributions that already summed to one, which
makes exp(-J) a constant ~1 with no gradient, and it compared class c's prototypes with the pixels of
class c - 1 (its pseudo mask had background at index 0). Here there is one softmax, and ``regions`` is
indexed by the same class index as the prototypes (``proto_class``), with no background channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pbip_engine.methods.pbip import losses as pbip_losses


@torch.no_grad()
def class_regions(
    fused: torch.Tensor, labels: torch.Tensor, delta: float, threshold: str = "per_class"
) -> torch.Tensor:
    """Omega_c as a bool ``[B, N, h, w]``: pixels whose label-restricted argmax of the fused CAM is c and
    that pass the mask refiner's foreground threshold ``t = delta * max`` for c.

    Restricting to the image's labels keeps a class that is not in the tile from claiming pixels (the
    reference did not restrict, so absent classes could collect a diversity term on other tissue).
    """
    present = labels[:, :, None, None] > 0.5
    fg = pbip_losses.foreground_masks(fused, delta, threshold) > 0
    scores = fused.float().masked_fill(~present, float("-inf"))
    winner = scores.argmax(1, keepdim=True)
    idx = torch.arange(fused.shape[1], device=fused.device).view(1, -1, 1, 1)
    return (winner == idx) & fg & present


def diversity_loss(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    regions: torch.Tensor,
    k: int,
    tau: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """L_div (Eq. 3-5) and the number of (image, class) pairs that had a region.

    ``features`` [B, C, h, w] (the stage used for diversity), ``prototypes`` [N * k, C] class-major and
    already projected to C, ``regions`` bool [B, N, h, w] (``class_regions``, same class order as the
    prototypes). For each (image b, class c) with at least two pixels in Omega_c, each of the k prototypes'
    cosine maps becomes one distribution over Omega_c by a single softmax (Eq. 3); the pairwise
    exp(-Jeffreys) similarities (Eq. 4-5) are averaged over the k(k-1)/2 pairs, then over the valid classes
    of the image, then over the images with a valid class. A class with k = 1 has no pairs: 0.
    """
    n = regions.shape[1]
    if prototypes.shape[0] != n * k:
        raise ValueError(f"{prototypes.shape[0]} prototypes for {n} classes x k={k}")
    zero = features.new_zeros((), dtype=torch.float32)
    if k < 2:
        return zero, 0
    mask = regions.flatten(2)  # [B, N, HW]
    b_idx, c_idx = torch.nonzero(mask.sum(-1) >= 2, as_tuple=True)
    if b_idx.numel() == 0:
        return zero, 0
    f = F.normalize(features.float(), dim=1).flatten(2)  # [B, C, HW]
    p = F.normalize(prototypes.float(), dim=-1).view(n, k, -1)  # [N, k, C]
    m = mask[b_idx, c_idx]  # [S, HW]
    cos = torch.einsum("sch,skc->skh", f[b_idx], p[c_idx]) / tau  # [S, k, HW]
    logp = F.log_softmax(cos.masked_fill(~m[:, None], float("-inf")), dim=-1)  # the one softmax, Eq. 3
    logp = torch.where(m[:, None], logp, torch.zeros_like(logp))
    prob = logp.exp() * m[:, None]
    # J(u, v) = sum_x (p_u - p_v)(log p_u - log p_v) = A_uu + A_vv - A_uv - A_vu with A = p @ log p^T
    a = prob @ logp.transpose(1, 2)  # [S, k, k]
    d = torch.diagonal(a, dim1=1, dim2=2)
    jeff = d[:, :, None] + d[:, None, :] - a - a.transpose(1, 2)
    iu = torch.triu_indices(k, k, offset=1, device=jeff.device)
    per_pair = torch.exp(-jeff[:, iu[0], iu[1]])  # [S, k(k-1)/2]
    per_class = per_pair.mean(1)  # [S], Eq. 5
    # mean over each image's valid classes, then over the images that have one
    b = features.shape[0]
    sums = per_class.new_zeros(b).index_add(0, b_idx, per_class)
    counts = per_class.new_zeros(b).index_add(0, b_idx, torch.ones_like(per_class))
    has = counts > 0
    return (sums[has] / counts[has]).mean(), int(b_idx.numel())


def infonce_losses(
    z_fg: torch.Tensor,
    z_bg: torch.Tensor,
    sample_class: torch.Tensor,
    prototypes: torch.Tensor,
    proto_class: torch.Tensor,
    *,
    tau: float = 0.07,
    hard_negatives: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """l_fg and l_bg for S (image, present class) crops already projected into the prototype space.

    FG (single positive, the reference's form): the positive is the class's prototype nearest the crop
    (one of k sub-patterns, so the k prototypes are not all pulled onto every crop); the negatives are the
    other classes' prototypes, or only the ``hard_negatives`` most similar of them. BG (multi-positive):
    every other-class prototype is a positive, the class's own prototypes are the negatives. Cosines over
    one temperature ``tau``; per-sample losses averaged. With a single class BG has no positive: 0.
    """
    if z_fg.shape[0] == 0:
        zero = z_fg.new_zeros((), dtype=torch.float32)
        return zero, zero
    p = F.normalize(prototypes.float(), dim=-1)
    s_fg = F.normalize(z_fg.float(), dim=-1) @ p.T / tau  # [S, M]
    s_bg = F.normalize(z_bg.float(), dim=-1) @ p.T / tau
    own = proto_class[None, :] == sample_class[:, None]  # [S, M]
    neg_inf = float("-inf")
    pos = s_fg.masked_fill(~own, neg_inf).amax(1, keepdim=True)  # [S, 1]
    neg = s_fg.masked_fill(own, neg_inf)
    n_other = int((~own[0]).sum())
    if hard_negatives and n_other > hard_negatives:
        neg = neg.topk(hard_negatives, dim=1).values
    l_fg = -(pos[:, 0] - torch.logsumexp(torch.cat([pos, neg], 1), 1)).mean()
    if n_other == 0:
        return l_fg, s_bg.new_zeros(())
    l_bg = -(torch.logsumexp(s_bg.masked_fill(own, neg_inf), 1) - torch.logsumexp(s_bg, 1)).mean()
    return l_fg, l_bg
