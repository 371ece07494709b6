"""MPAMatch's losses: UniMatch's confidence-masked consistency, Dice, and the pixel-to-prototype contrasts.

Both contrasts are the same InfoNCE over classes: a pixel embedding against one prototype per class
(image prototypes: an EMA of pixel embeddings per class; text prototypes: projected class prompts), with
the pixel's label (or its confident pseudo label) as the positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pbip_engine.engine.metrics import IGNORE_INDEX


def masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Pixel CE against (pseudo) labels, counted where ``keep``; averaged over all pixels (UniMatch)."""
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    return (loss * keep.float()).sum() / max(1, keep.numel())


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """1 - soft Dice averaged over the classes present in ``target`` (ignored pixels left out)."""
    n = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).float()
    prob = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp_max(n - 1), n).permute(0, 3, 1, 2).float() * valid
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    if not bool(present.any()):
        return logits.float().sum() * 0.0
    return 1 - ((2 * inter + 1) / (denom + 1))[present].mean()


def labels_at(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour labels at an embedding map's size (``B,h,w`` long)."""
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


def pixels(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B,D,h,w`` embeddings + ``B,h,w`` labels -> (N,D) and (N,) over non-ignored pixels."""
    e = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    return e[keep], y[keep]


def sample(e: torch.Tensor, y: torch.Tensor, n: int, generator: torch.Generator | None = None):
    """At most ``n`` pixels, uniformly (the contrasts' cost stays fixed whatever the tile size)."""
    if len(y) <= n:
        return e, y
    idx = torch.randperm(len(y), generator=generator)[:n].to(y.device)
    return e[idx], y[idx]


@torch.no_grad()
def update_prototypes(protos: torch.Tensor, seen: torch.Tensor, e: torch.Tensor, y: torch.Tensor,
                      momentum: float) -> None:  # fmt: skip
    """EMA of each class's mean embedding (first sighting: the mean itself), re-normalised; in place.

    Under data-parallel training the class sums and counts are summed over all workers first, so every
    worker moves its prototypes by the same global mean (else DDP's buffer broadcast would keep rank 0's
    copy and drop what the other workers saw). Every worker must call this on every step, even with no
    pixels (``e`` and ``y`` empty), because the sum is a collective.
    """
    n_classes = protos.shape[0]
    sums = torch.zeros(protos.shape, dtype=torch.float32, device=protos.device)
    counts = torch.zeros(n_classes, dtype=torch.float32, device=protos.device)
    if len(y):
        sums.index_add_(0, y, e.float())
        counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float32, device=protos.device))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    for c in torch.nonzero(counts > 0).flatten().tolist():
        mean = F.normalize(sums[c] / counts[c], dim=0).to(protos.dtype)
        if bool(seen[c]):
            protos[c] = F.normalize(momentum * protos[c] + (1 - momentum) * mean, dim=0)
        else:
            protos[c] = mean
            seen[c] = True


def prototype_contrast(e: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, tau: float,
                       valid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """InfoNCE of pixel embeddings ``e`` (N,D, unit) against class prototypes (C,D, unit), positive = ``y``.

    ``valid`` (C,) drops classes without a prototype yet from the negatives; pixels of such classes are skipped.
    """
    if not len(y):
        return protos.sum() * 0.0 + e.sum() * 0.0
    logits = e.float() @ protos.float().t() / tau
    if valid is not None:
        logits = logits.masked_fill(~valid[None], float("-inf"))
        keep = valid[y]
        if not bool(keep.any()):
            return e.sum() * 0.0
        logits, y = logits[keep], y[keep]
    return F.cross_entropy(logits, y)
