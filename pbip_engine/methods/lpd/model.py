"""LPD stage 1 (paper §2.1-2.3): PBIP's ClassNet with k *learnable* prototypes per class, trained end to end.

``LpdNet`` is ClassNet (per-level heads phi_i projecting the prototypes into each level's channels, a true
cosine - both sides L2-normalised - scaled by a learnable 1/tau_i, the class's k maps merged by attention)
whose prototype matrix P [N*k, d_proto] is an ``nn.Parameter`` rather than a fixed bank, plus psi, the linear
map that takes the frozen encoder's FG/BG crop features into the prototype space for the InfoNCE.
``lpd_step`` is the loss: classification on every level, and after ``warmup_iters`` the mask refiner's
InfoNCE and the diversity regulariser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pbip_engine.engine.training.inputs import unwrap
from pbip_engine.methods.lpd import losses as LL
from pbip_engine.methods.pbip import losses as L
from pbip_engine.methods.pbip.classnet import (
    ClassNet,
    ClassNetConfig,
    ImgMatchNet,
    classnet_backbone,
    freeze_encoder,
)


@dataclass
class LpdNetConfig(ClassNetConfig):
    """ClassNet's settings plus LPD's; stored in the checkpoint, so a model rebuilds without the spec."""

    merge_train: str = "softmax_max"
    merge_eval: str = "softmax_max"
    delta: float = 0.5
    tau: float = 0.07
    k: int = 10
    proto_dim: int = 512
    enc_dim: int = 512  # the frozen encoder's feature size (psi's input)
    init: str = "random"
    hard_negatives: int = 0
    lambda_sim: float = 0.1
    lambda_div: float = 0.5
    div_level: int = -1
    div_tau: float = 1.0
    warmup_iters: int = 3000


class LpdNet(ClassNet):
    """ClassNet with learnable prototypes P (class-major, k per class) and the crop projection psi."""

    def __init__(
        self, backbone: nn.Module, prototypes: torch.Tensor, k: int, enc_dim: int, **kw: Any
    ) -> None:
        n = prototypes.shape[0] // k
        super().__init__(backbone, prototypes, [k] * n, normalize_prototypes=True, **kw)
        self.k = k
        self.prototypes = nn.Parameter(prototypes.float().clone())  # replaces ClassNet's fixed buffer
        d = prototypes.shape[1]
        self.psi = nn.Linear(enc_dim, d)
        if enc_dim == d:  # same space (e.g. prototypes started from the bank): start as the identity
            nn.init.eye_(self.psi.weight)
        else:
            nn.init.trunc_normal_(self.psi.weight, std=0.02)
        nn.init.zeros_(self.psi.bias)
        # Training iterations so far: decides the warm-up, and travels with the checkpoint so a resumed
        # run does not warm up again.
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))


def initial_prototypes(
    n_classes: int, k: int, dim: int, bank: tuple[torch.Tensor, list[int]] | None = None, seed: int = 0
) -> torch.Tensor:
    """[N*k, d] starting prototypes: N(0, 1) (the paper), or the bank's k-means centres of each class.

    With a bank, class c's k prototypes cycle through its K_c centres; repeats get a small jitter so that
    they are not identical (identical prototypes would get identical gradients and never separate).
    """
    g = torch.Generator().manual_seed(seed)
    if bank is None:
        return torch.randn(n_classes * k, dim, generator=g)
    protos, k_list = bank
    if len(k_list) != n_classes:
        raise ValueError(f"the bank has {len(k_list)} classes, the spec {n_classes}")
    out, start = [], 0
    for kc in k_list:
        centres = protos[start : start + kc].float()
        start += kc
        rows = centres[torch.arange(k) % kc]
        jitter = (
            torch.randn(rows.shape, generator=g)
            * 0.05
            * rows.norm(dim=1, keepdim=True)
            / rows.shape[1] ** 0.5
        )
        jitter[: min(k, kc)] = 0
        out.append(rows + jitter)
    return torch.cat(out)


def build_lpdnet(
    cfg: LpdNetConfig,
    n_classes: int,
    prototypes: torch.Tensor | np.ndarray | None = None,
    backbone: nn.Module | None = None,
) -> LpdNet:
    """LpdNet for ``cfg``; ``prototypes`` [N*k, d] are the starting values (zeros of the right shape when a
    checkpoint will overwrite them); ``backbone`` overrides ``cfg.backbone`` (tests pass tiny ones)."""
    cfg.validate()
    if prototypes is None:
        prototypes = torch.zeros(n_classes * cfg.k, cfg.proto_dim)
    p = torch.as_tensor(prototypes).float()
    if tuple(p.shape) != (n_classes * cfg.k, cfg.proto_dim):
        raise ValueError(f"prototypes are {tuple(p.shape)}, expected ({n_classes * cfg.k}, {cfg.proto_dim})")
    net = LpdNet(
        classnet_backbone(cfg, backbone), p, cfg.k, cfg.enc_dim, hidden=cfg.hidden, merge_train=cfg.merge_train,
        merge_eval=cfg.merge_eval, logit_scale_init=cfg.logit_scale_init, learn_logit_scale=cfg.learn_logit_scale,
    )  # fmt: skip
    net.matcher = ImgMatchNet(cfg.delta, cfg.threshold, cfg.fuse_weights, cfg.sim_size, cfg.mean, cfg.std)
    return net


def lpd_step(
    model: nn.Module, encoder: nn.Module | None, batch: dict[str, torch.Tensor], cfg: LpdNetConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_cls + lambda_sim * (l_fg + l_bg) + lambda_div * L_div`` (the last two after the warm-up).

    Counts an iteration when the model is in training mode. ``model`` may be DDP-wrapped.
    """
    net: LpdNet = unwrap(model)
    x, y = batch["image"], batch["labels"].float()
    if y.ndim != 2 or y.shape[1] != net.n_classes:
        raise ValueError(f"labels must be [B, {net.n_classes}], got shape {tuple(y.shape)}")
    out = model(x)
    l_cls = L.classification_loss(out["logits"], y, cfg.level_weights)
    warm = int(net.iters) >= cfg.warmup_iters
    if net.training:
        net.iters += 1
    zero = l_cls.new_zeros(())
    l_fg = l_bg = l_div = zero
    n_sim = n_div = 0
    # psi is idle in the warm-up: a zero-weighted term keeps DDP from waiting for its gradient
    idle = sum(p.sum() for p in net.psi.parameters()) * 0.0
    if warm:
        scales = out["scales"]
        cos_cams = [c / scales[i] for i, c in enumerate(out["cams"])]
        if cfg.use_sim and cfg.lambda_sim > 0 and encoder is not None:
            if encoder.training:
                freeze_encoder(encoder)
            m = net.matcher(cos_cams, x, y, encoder)
            n_sim = int(m["class_index"].numel())
            if n_sim:
                l_fg, l_bg = LL.infonce_losses(
                    net.psi(m["f_fg"].float()), net.psi(m["f_bg"].float()), m["class_index"],
                    net.prototypes, net.proto_class, tau=cfg.tau, hard_negatives=cfg.hard_negatives,
                )  # fmt: skip
                idle = zero
        if cfg.lambda_div > 0:
            feats = out["features"][cfg.div_level]
            fused = L.fuse_for_matching(cos_cams, tuple(feats.shape[-2:]), cfg.fuse_weights)
            regions = LL.class_regions(fused, y, cfg.delta, cfg.threshold)
            l_div, n_div = LL.diversity_loss(
                feats, out["projected"][cfg.div_level], regions, net.k, tau=cfg.div_tau
            )
    l_sim = l_fg + l_bg
    total = l_cls + cfg.lambda_sim * l_sim + cfg.lambda_div * l_div + idle
    stats = {
        "l_cls": float(l_cls.detach()),
        "l_fg": float(l_fg.detach()),
        "l_bg": float(l_bg.detach()),
        "l_div": float(l_div.detach()),
        "total": float(total.detach()),
        "n_sim": float(n_sim),
        "n_div": float(n_div),
        "warm": float(warm),
    }
    return total, stats
