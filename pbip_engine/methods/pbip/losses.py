"""PBIP stage-1 losses (paper Eq. 3-13) as pure tensor functions, so they test without a model.

* ``classification_loss``: L_CLS = sum_i w_i BCE-with-logits(y, y_hat_i)   (Eq. 7-8)
* ``fuse_for_matching``:   M' = sum_i w_i Up(M_i)                           (Eq. 3)
* ``foreground_masks``:    tau = delta * max(M'), b = [M' >= tau]           (Eq. 4)
* ``compose_fg_bg``:       X_FG = b*M*X, X_BG = (1-b)*(1-M)*X               (Eq. 5)
* ``similarity_losses``:   L_FGS (Eq. 9-10), L_BGS (Eq. 11-12); L_SIM = theta1*L_FGS + theta2*L_BGS (Eq. 13)

The reference code's variants (per-image threshold, batch-summed InfoNCE with tau = 0.07) are options
here; ``methods.pbip.classnet.VARIANTS`` is the one place that lists which option is whose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SIM_LOSSES = ("paper", "paper_mean", "infonce_batch")
THRESHOLDS = ("per_class", "per_image")


def classification_loss(
    logits: Sequence[torch.Tensor], labels: torch.Tensor, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted sum over levels of multi-label BCE-with-logits (each level's mean over B x N)."""
    if weights is None:
        weights = [1.0] * len(logits)
    if len(weights) != len(logits):
        raise ValueError(f"{len(weights)} level weights for {len(logits)} levels")
    y = labels.float()
    total = logits[0].new_zeros((), dtype=torch.float32)
    for w, z in zip(weights, logits, strict=True):
        total = total + float(w) * F.binary_cross_entropy_with_logits(z.float(), y)
    return total


def fuse_for_matching(
    cams: Sequence[torch.Tensor], size: tuple[int, int], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Eq. 3: bilinear upsampling of each level's class map to ``size`` and a (weighted) sum; differentiable."""
    if weights is None:
        weights = [1.0] * len(cams)
    if len(weights) != len(cams):
        raise ValueError(f"{len(weights)} fusion weights for {len(cams)} levels")
    fused = None
    for w, m in zip(weights, cams, strict=True):
        if float(w) == 0.0:
            continue
        up = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
        fused = float(w) * up if fused is None else fused + float(w) * up
    if fused is None:
        raise ValueError("all fusion weights are zero")
    return fused


def minmax_per_channel(m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each ``[b, c]`` map to [0, 1] (differentiable; a constant map becomes 0)."""
    flat = m.flatten(2)
    lo = flat.min(-1, keepdim=True).values.unsqueeze(-1)
    hi = flat.max(-1, keepdim=True).values.unsqueeze(-1)
    return (m - lo) / (hi - lo).clamp_min(eps)


def foreground_masks(fused: torch.Tensor, delta: float, threshold: str = "per_class") -> torch.Tensor:
    """Eq. 4 binary mask b (no gradient): ``M' >= delta * max`` on the ReLU'd fused map.

    ``per_class`` (paper): the max is taken per image and class. ``per_image`` (reference code): one max
    over all classes and pixels of the image. Negative cosines count as no evidence (ReLU) and a map that is
    zero everywhere yields an empty foreground rather than an all-ones one.
    """
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")
    with torch.no_grad():
        pos = fused.detach().float().clamp_min(0)
        dims = (2, 3) if threshold == "per_class" else (1, 2, 3)
        tau = delta * pos.amax(dim=dims, keepdim=True)
        return ((pos >= tau) & (pos > 0)).to(fused.dtype)


def compose_fg_bg(
    image01: torch.Tensor, soft: torch.Tensor, binary: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 for S samples: ``image01`` [S,3,H,W] in [0, 1], ``soft``/``binary`` [S,H,W] -> FG, BG images.

    Gradients flow through the soft map M into ClassNet; the binary mask b is constant.
    """
    m = soft.unsqueeze(1)
    b = binary.unsqueeze(1)
    return b * m * image01, (1 - b) * (1 - m) * image01


def similarity_losses(
    f_fg: torch.Tensor,
    f_bg: torch.Tensor,
    sample_class: torch.Tensor,
    prototypes: torch.Tensor,
    proto_class: torch.Tensor,
    *,
    tau: float = 1.0,
    variant: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_FGS and L_BGS for S (image, present class) samples against the raw bank prototypes.

    ``f_fg``/``f_bg`` [S, d] encoder features, ``sample_class`` [S] (0-based class of each sample),
    ``prototypes`` [M, d] (class-major, any K per class), ``proto_class`` [M]. Features and prototypes are
    L2-normalised, so every s is a cosine. Variants:

    * ``paper`` (Eq. 9-12 as printed): FG uses s_FF = sum over the K target prototypes and s_FB = sum over
      all other prototypes; BG uses the *means* s_BB over non-target and s_BF over target prototypes;
      -log two-way softmax with temperature tau, averaged over samples.
    * ``paper_mean``: as ``paper`` but FG also uses means (the two terms then have the same scale).
    * ``infonce_batch`` (reference code): FG = -log(sum_i sum_pos e^{s/tau} / sum_i sum_all e^{s/tau}),
      BG positive = mean over non-target prototypes of e^{s/tau}, negative adds sum over target
      prototypes; both summed over the batch *before* the log. The reference drew one positive
      sub-class per sample; here the K target prototypes are all positives.
    """
    if variant not in SIM_LOSSES:
        raise ValueError(f"similarity loss variant must be one of {SIM_LOSSES}, got {variant!r}")
    if f_fg.shape[0] == 0:
        z = f_fg.new_zeros((), dtype=torch.float32)
        return z, z
    p = F.normalize(prototypes.float(), dim=-1)
    s_fg = F.normalize(f_fg.float(), dim=-1) @ p.T  # [S, M]
    s_bg = F.normalize(f_bg.float(), dim=-1) @ p.T
    target = (proto_class[None, :] == sample_class[:, None]).to(s_fg.dtype)  # [S, M]
    other = 1.0 - target
    n_t = target.sum(1).clamp_min(1)
    n_o = other.sum(1).clamp_min(1)

    if variant in ("paper", "paper_mean"):
        if variant == "paper":
            ff, fb = (s_fg * target).sum(1), (s_fg * other).sum(1)
        else:
            ff, fb = (s_fg * target).sum(1) / n_t, (s_fg * other).sum(1) / n_o
        bb, bf = (s_bg * other).sum(1) / n_o, (s_bg * target).sum(1) / n_t
        l_fgs = -F.log_softmax(torch.stack([ff, fb], 1) / tau, dim=1)[:, 0].mean()
        l_bgs = -F.log_softmax(torch.stack([bb, bf], 1) / tau, dim=1)[:, 0].mean()
        return l_fgs, l_bgs

    neg_inf = torch.finfo(s_fg.dtype).min
    z_fg = s_fg / tau
    l_fgs = -(
        torch.logsumexp(z_fg.masked_fill(target == 0, neg_inf).flatten(), 0)
        - torch.logsumexp(z_fg.flatten(), 0)
    )
    z_bg = s_bg / tau
    # per sample: log mean_{other} e^z and log sum_{target} e^z
    log_pos = torch.logsumexp(z_bg.masked_fill(other == 0, neg_inf), 1) - torch.log(n_o)
    log_tgt = torch.logsumexp(z_bg.masked_fill(target == 0, neg_inf), 1)
    log_num = torch.logsumexp(log_pos, 0)
    log_den = torch.logsumexp(torch.cat([log_pos, log_tgt]), 0)
    return l_fgs, -(log_num - log_den)
