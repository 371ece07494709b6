"""PBIP stage 1: ClassNet (prototype-cosine CAMs, Eq. 2, 7-8) and ImgMatchNet (FG/BG matching, Eq. 3-13).

ClassNet projects the fixed bank prototypes P [sum K, d] into each backbone level's channel space with a
per-level MLP (d -> hidden -> C_i), takes the per-pixel cosine to every projected prototype (sub-class
CAMs), merges the K sub-classes of each class (Eq. 2: mean) and global-average-pools to per-level logits.

Because a cosine lies in [-1, 1], GAP'd cosines cannot saturate a BCE (sigmoid(1) = 0.73), so each level
multiplies its cosines by a learnable scale s_i (initialised to 1/0.07 like the reference code's
``logit_scale``, applied as is, not exp). Returned ``cams`` are in these logit units; pseudo masks
min-max each level, so s_i never changes a mask; ImgMatchNet divides it out again, so Eq. 3 fuses the plain
cosine maps of Eq. 2.

ImgMatchNet sends, for every (image, present class) pair, a foreground and a background image through the
*frozen* bank encoder (the one that built P) and compares the features with the raw prototypes. The
images reaching ClassNet are normalised with ``cfg.mean/std`` (the backbone's statistics); for the encoder
we denormalise to [0, 1] RGB, apply Eq. 5 there (masked pixels become black), resize to the encoder's
``info.input_size`` (or ``cfg.sim_size``), honour its ``channel_order``/``minmax`` flags and normalise with
its ``info.mean/std``. Gradients reach ClassNet only through the soft map M; the encoder is in eval mode
with ``requires_grad=False`` so its weights receive none.

``VARIANTS`` below is the single table of where the paper and the public reference code differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.nn.backbones import create_backbone, feature_channels
from pbip_engine.engine.nn.mit import PBIP_STRIDES
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD
from pbip_engine.engine.training.inputs import unwrap
from pbip_engine.methods.pbip import losses as L

MERGES = ("mean", "softmax_max")
POOLINGS = ("gap", "competitive")  # image logits from the CAMs: Eq. 4 or classes competing per pixel

VARIANTS: dict[str, dict[str, Any]] = {
    # The paper (CVPR 2025, §3.3-3.5, §4.1). These are the ClassNetConfig defaults.
    "paper": {},
    # The public code (QingchenTang/PBIP @ 6d40540) where it differs from the paper:
    #   merge_eval      softmax-weighted 'max' over the K sub-classes at val/test (mean in training)
    #   normalize_prototypes   only pixel features are L2-normalised, projected prototypes are not
    #   levels/level_weights   4 levels with BCE weights 0 / 0.1 / 1 / 1
    #   fuse_weights    matching uses the last level's CAM only; eval fuses 0.3 / 0.3 / 0.4 (levels 2-4)
    #   threshold/delta per-image max over all classes, delta (``mask_adapter_alpha``) 0.5
    #   sim_loss/tau    InfoNCE with tau 0.07, summed over the batch before the log
    #   beta/theta      0.1 * (L_fg + L_bg + 5e-4 * mean(CAM_last)); lr 5e-5, wd 1e-3, 8 epochs
    #   (not reproduced: sub-class sample selection by logit > parent mean, Swin-T "MedCLIP" encoder,
    #    weight decay on norms/scales, poly LR, 6x TTA; its backbone was mit_b1 with strides 4,2,2,1)
    "reference": {
        "merge_eval": "softmax_max",
        "normalize_prototypes": False,
        "levels": (1, 2, 3, 4),
        "level_weights": (0.0, 0.1, 1.0, 1.0),
        "fuse_weights": (0.0, 0.0, 0.0, 1.0),
        "eval_fuse_weights": (0.0, 0.3, 0.3, 0.4),
        "threshold": "per_image",
        "delta": 0.5,
        "sim_loss": "infonce_batch",
        "tau": 0.07,
        "beta": 0.1,
        "theta1": 1.0,
        "theta2": 1.0,
        "cam_penalty": 5e-4,
        "lr": 5e-5,
        "weight_decay": 1e-3,
        "epochs": 8,
    },
}


@dataclass
class ClassNetConfig:
    """Stage-1 settings; defaults follow the paper (see ``VARIANTS`` for the reference code's)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool | str = True
    levels: tuple[int, ...] = (2, 3, 4)  # backbone feature levels used as the paper's i = 1..3
    mit_strides: tuple[int, ...] = PBIP_STRIDES
    hidden: int = 256
    merge_train: str = "mean"
    merge_eval: str = "mean"
    normalize_prototypes: bool = True  # Eq. 2 is a true cosine
    logit_scale_init: float = 1.0 / 0.07
    learn_logit_scale: bool = True
    level_weights: tuple[float, ...] | None = None  # None = 1 each (Eq. 8)
    delta: float = 0.15
    threshold: str = "per_class"
    sim_loss: str = "paper"
    alpha: float = 1.0
    beta: float = 0.5
    tau: float = 1.0
    theta1: float = 1.0
    theta2: float = 0.5
    cam_penalty: float = 0.0
    cam_readout: str = "minmax"  # "raw": pseudo masks from the raw fused CAMs (cams.predict_cams)
    input_px: int | None = None  # tiles resized to this edge for the network (OEEM: 112-px patches at 224)
    pooling: str = "gap"  # "competitive": classes compete per pixel before pooling (see competitive_logits)
    pool_top: float = 0.1  # competitive: fraction of pixels whose class probability makes the image score
    use_sim: bool = True
    fuse_weights: tuple[float, ...] | None = None  # None = equal (Eq. 3)
    sim_size: int | None = None  # FG/BG edge fed to the bank encoder; None = encoder's input size
    lr: float = 1e-5
    new_parts_lr_mult: float = 1.0  # LR multiple of the fresh projectors/logit scale over the backbone
    weight_decay: float = 0.003
    epochs: int = 10
    batch_size: int = 10
    amp: bool = True
    grad_clip: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_fuse_weights: tuple[float, ...] | None = None
    eval_background: str = "none"
    eval_ignore_background: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ClassNetConfig:
        if name not in VARIANTS:
            raise ValueError(f"unknown ClassNet variant {name!r}; known: {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ClassNetConfig keys {unknown}; known: {sorted(known)}")
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> ClassNetConfig:
        for name in ("merge_train", "merge_eval"):
            if getattr(self, name) not in MERGES:
                raise ValueError(f"{name} must be one of {MERGES}, got {getattr(self, name)!r}")
        if self.threshold not in L.THRESHOLDS:
            raise ValueError(f"threshold must be one of {L.THRESHOLDS}, got {self.threshold!r}")
        if self.sim_loss not in L.SIM_LOSSES:
            raise ValueError(f"sim_loss must be one of {L.SIM_LOSSES}, got {self.sim_loss!r}")
        n = len(self.levels)
        for name in ("level_weights", "fuse_weights", "eval_fuse_weights"):
            w = getattr(self, name)
            if w is not None and len(w) != n:
                raise ValueError(f"{name} has {len(w)} entries but levels={self.levels} has {n}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        return self


class PrototypeProjector(nn.Module):
    """Linear d -> hidden -> ReLU -> Linear hidden -> C_i (truncated-normal 0.02, zero bias, as the reference)."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)
        for m in (self.fc1, self.fc2):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(p)))


def _flatten_prototypes(
    prototypes: torch.Tensor | np.ndarray, k_list: Sequence[int] | None, n_classes: int
) -> tuple[torch.Tensor, list[int]]:
    p = torch.as_tensor(np.asarray(prototypes) if not torch.is_tensor(prototypes) else prototypes).float()
    if p.ndim == 3:
        n, k, _ = p.shape
        if k_list is not None and list(k_list) != [k] * n:
            raise ValueError(f"prototypes are [{n}, {k}, d] but k_list is {list(k_list)}")
        k_list = [k] * n
        p = p.reshape(n * k, -1)
    if p.ndim != 2:
        raise ValueError(f"prototypes must be [sum K, d] or [N, K, d], got shape {tuple(p.shape)}")
    if k_list is None:
        raise ValueError("k_list is required with flat [sum K, d] prototypes")
    k_list = [int(k) for k in k_list]
    if len(k_list) != n_classes or any(k < 1 for k in k_list):
        raise ValueError(f"k_list {k_list} must have one entry >= 1 per class (n_classes={n_classes})")
    if sum(k_list) != p.shape[0]:
        raise ValueError(f"k_list sums to {sum(k_list)} but there are {p.shape[0]} prototypes")
    if not torch.isfinite(p).all():
        raise ValueError("prototypes contain NaN/inf")
    return p.contiguous(), k_list


class ClassNet(nn.Module):
    """Backbone + per-level prototype projections -> sub-class CAMs -> class CAMs and logits per level.

    ``forward(x)`` returns ``cams`` (list of [B,N,h_i,w_i], logit units), ``logits`` (list of [B,N]),
    ``subclass_cams`` / ``subclass_logits`` (sum K channels), ``scales`` ([L], the s_i), and per level the
    backbone ``features`` and ``projected`` prototypes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        prototypes: torch.Tensor,
        k_list: Sequence[int],
        *,
        hidden: int = 256,
        merge_train: str = "mean",
        merge_eval: str = "mean",
        normalize_prototypes: bool = True,
        logit_scale_init: float = 1.0 / 0.07,
        learn_logit_scale: bool = True,
        pooling: str = "gap",
        pool_top: float = 0.1,
    ) -> None:
        super().__init__()
        for m in (merge_train, merge_eval):
            if m not in MERGES:
                raise ValueError(f"merge must be one of {MERGES}, got {m!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0 < pool_top <= 1:
            raise ValueError(f"pool_top must be in (0, 1], got {pool_top}")
        self.pooling, self.pool_top = pooling, float(pool_top)
        self.backbone = backbone
        self.k_list = list(k_list)
        self.n_classes = len(self.k_list)
        self.merge_train, self.merge_eval = merge_train, merge_eval
        self.normalize_prototypes = normalize_prototypes
        self.register_buffer("prototypes", prototypes.float().clone())
        proto_class = torch.repeat_interleave(torch.arange(self.n_classes), torch.tensor(self.k_list))
        self.register_buffer("proto_class", proto_class, persistent=False)
        avg = torch.zeros(self.n_classes, prototypes.shape[0])
        avg[proto_class, torch.arange(prototypes.shape[0])] = (
            1.0 / torch.tensor(self.k_list, dtype=torch.float)[proto_class]
        )
        self.register_buffer("_merge_mean", avg, persistent=False)
        channels = feature_channels(backbone)
        dim = prototypes.shape[1]
        self.projectors = nn.ModuleList(PrototypeProjector(dim, hidden, c) for c in channels)
        scale = torch.full((len(channels),), float(logit_scale_init))
        if learn_logit_scale:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.matcher = ImgMatchNet()  # parameter-free; build_classnet configures it from the config

    @property
    def merge(self) -> str:
        return self.merge_train if self.training else self.merge_eval

    def merge_subclasses(self, z: torch.Tensor, rule: str | None = None) -> torch.Tensor:
        """[B, sum K, ...] -> [B, N, ...] by the mean (Eq. 2) or the softmax-weighted 'max' of the K."""
        rule = rule or self.merge
        if rule == "mean":
            return torch.einsum("nm,bm...->bn...", self._merge_mean.to(z.dtype), z)
        out = []
        start = 0
        for k in self.k_list:
            zk = z[:, start : start + k]
            out.append((zk.softmax(dim=1) * zk).sum(1))
            start += k
        return torch.stack(out, 1)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.backbone(x)
        cams, logits, sub_cams, sub_logits, projected = [], [], [], [], []
        for i, (f, proj) in enumerate(zip(feats, self.projectors, strict=True)):
            p = proj(self.prototypes.to(f.dtype))
            if self.normalize_prototypes:
                p = F.normalize(p, dim=-1)
            projected.append(p)
            cos = torch.einsum("bchw,mc->bmhw", F.normalize(f, dim=1), p)
            sub = self.logit_scale[i] * cos
            sub_cams.append(sub)
            sub_logits.append(sub.mean((2, 3)))
            cams.append(self.merge_subclasses(sub))
            if self.pooling == "gap":
                logits.append(self.merge_subclasses(sub_logits[-1]))
            else:
                logits.append(competitive_logits(cams[-1], self.pool_top))
        return {
            "cams": cams,
            "logits": logits,
            "subclass_cams": sub_cams,
            "subclass_logits": sub_logits,
            "scales": self.logit_scale,
            "features": feats,  # per level, for methods that regularise on them (LPD's diversity term)
            "projected": projected,  # the prototypes in each level's channel space
        }


def resize_input(x: torch.Tensor, input_px: int | None) -> torch.Tensor:
    """Normalised ``B,3,h,w`` -> ``B,3,input_px,input_px`` (bilinear); unchanged without ``input_px``.

    A larger network input than the tile gives finer CAMs (at 112 px the stride-8/16/32 levels are
    14/7/4 cells, at 224 px 28/14/7); the CAMs are resized back to the tile for the pseudo masks.
    """
    if not input_px or tuple(x.shape[-2:]) == (input_px, input_px):
        return x
    return F.interpolate(x, size=(input_px, input_px), mode="bilinear", align_corners=False,
                         antialias=input_px < x.shape[-1])  # fmt: skip


def competitive_logits(cams: torch.Tensor, top: float = 0.1, eps: float = 1e-4) -> torch.Tensor:
    """[B,N,h,w] class CAMs (logit units) -> [B,N] image logits where the classes compete for each pixel.

    With global average pooling (the paper's Eq. 4) each class's CAM is pooled on its own, so where
    several classes are present (80 % of GlaS patches hold gland and non-gland) the cheapest fit is to
    raise every present class everywhere: the CAMs then say "present" but not "where". Here each pixel's
    softmax over the classes is a share of that pixel, and a class's image score is its mean share over
    its ``top`` fraction of pixels, as a logit for the same BCE. A present class must win some pixels and
    an absent one none, so the classes have to split the patch between them.
    """
    p = cams.float().softmax(1).flatten(2)
    k = max(1, round(top * p.shape[-1]))
    q = p.topk(k, dim=-1).values.mean(-1).clamp(eps, 1 - eps)
    return (q.log() - (-q).log1p()).to(cams.dtype)


def freeze_encoder(encoder: nn.Module) -> nn.Module:
    """Eval mode and no weight gradients: the bank encoder defines the prototype space and must not drift."""
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


SIM_BATCH_MULTIPLE = 16  # the FG/BG pairs per step are padded to a multiple of this


class ImgMatchNet(nn.Module):
    """FG/BG separation (Eq. 3-5) and encoding by the frozen bank encoder; no parameters of its own."""

    pad_multiple: int | None = (
        None  # the encoder batch's multiple; None: SIM_BATCH_MULTIPLE on CUDA, else none
    )

    def __init__(
        self,
        delta: float = 0.15,
        threshold: str = "per_class",
        fuse_weights: Sequence[float] | None = None,
        sim_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.delta, self.threshold = delta, threshold
        self.fuse_weights = fuse_weights
        self.sim_size = sim_size
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def encoder_input(self, images01: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        """[0, 1] RGB -> what ``encoder`` expects (size, channel order, statistics, optional min-max)."""
        info = getattr(encoder, "info", None)
        size = self.sim_size or (getattr(info, "input_size", None) if info is not None else None)
        x = images01
        if size and tuple(x.shape[-2:]) != (size, size):
            down = size < x.shape[-1]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
        if getattr(encoder, "channel_order", "rgb") == "bgr":
            x = x.flip(1)
        mean = getattr(info, "mean", IMAGENET_MEAN)
        std = getattr(info, "std", IMAGENET_STD)
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        # like engine.encoders.Encoder.preprocess: info.mean/std are in the order of the channels fed
        x = (x - m) / s
        if getattr(encoder, "minmax", False):
            x = L.minmax_per_channel(x.flatten(1).unsqueeze(1).unsqueeze(-1)).view_as(x)
        return x

    def forward(
        self, cams: Sequence[torch.Tensor], x: torch.Tensor, labels: torch.Tensor, encoder: nn.Module
    ) -> dict[str, torch.Tensor]:
        """``cams``: per-level class maps in cosine units; ``x``: backbone-normalised input; ``labels`` [B, N].

        Returns FG/BG features [S, d] for the S (image, present class) pairs, their image and class index,
        and the fused map (for logging/tests).
        """
        h, w = x.shape[-2:]
        fused = L.fuse_for_matching(cams, (h, w), self.fuse_weights)  # [B, N, H, W]
        b_idx, c_idx = torch.nonzero(labels > 0.5, as_tuple=True)
        out: dict[str, torch.Tensor] = {"fused": fused, "image_index": b_idx, "class_index": c_idx}
        if b_idx.numel() == 0:
            return out
        s = b_idx.numel()
        # On CUDA, pad the pairs to a multiple of SIM_BATCH_MULTIPLE (repeats of the first, dropped below): the
        # encoder then sees a handful of batch sizes instead of a new one per batch, which cuDNN's autotuning
        # (benchmark mode) would re-tune every step: on an H200 that held stage 1 at 38 images/s. On a CPU
        # nothing is tuned per shape, and the padding would only add encoder work.
        multiple = self.pad_multiple or (SIM_BATCH_MULTIPLE if x.is_cuda else 1)
        pad = -s % multiple
        bp, cp = (torch.cat([i, i[:1].expand(pad)]) for i in (b_idx, c_idx))
        binary = L.foreground_masks(fused, self.delta, self.threshold)[bp, cp]  # [S + pad, H, W]
        soft = L.minmax_per_channel(fused)[bp, cp]
        image01 = (x.float() * self.std + self.mean).clamp(0, 1)[bp]
        fg, bg = L.compose_fg_bg(image01, soft.float(), binary.float())
        feats = encoder(self.encoder_input(torch.cat([fg, bg]), encoder))
        if isinstance(feats, (list, tuple)):
            feats = feats[0]
        if feats.ndim != 2:
            raise ValueError(f"bank encoder must return [B, d] features, got shape {tuple(feats.shape)}")
        n = s + pad
        out.update(f_fg=feats[:s], f_bg=feats[n : n + s], binary=binary[:s])
        return out


def classnet_backbone(cfg: ClassNetConfig, backbone: nn.Module | None = None) -> nn.Module:
    """``cfg.backbone`` with one feature map per ``cfg.levels`` (or ``backbone``, checked the same way)."""
    if backbone is None:
        kw: dict[str, Any] = {}
        if cfg.backbone.startswith("mit_"):
            kw["strides"] = tuple(cfg.mit_strides)
        pretrained = cfg.pretrained
        if isinstance(pretrained, str) and pretrained.lower() in ("true", "false"):
            pretrained = pretrained.lower() == "true"
        backbone = create_backbone(cfg.backbone, pretrained=pretrained, out_indices=cfg.levels, **kw)
    n_levels = len(feature_channels(backbone))
    if n_levels != len(cfg.levels):
        raise ValueError(f"backbone returns {n_levels} levels but cfg.levels={cfg.levels}")
    return backbone


def build_classnet(
    cfg: ClassNetConfig,
    prototypes: torch.Tensor | np.ndarray,
    k_list: Sequence[int] | None,
    n_classes: int,
    backbone: nn.Module | None = None,
) -> ClassNet:
    """ClassNet for ``cfg`` around the bank's prototypes ([sum K, d] class-major + ``k_list``, or [N, K, d]).

    ``backbone`` overrides ``cfg.backbone`` (tests pass tiny ones); it must return one map per level.
    """
    cfg.validate()
    p, k_list = _flatten_prototypes(prototypes, k_list, n_classes)
    net = ClassNet(
        classnet_backbone(cfg, backbone),
        p,
        k_list,
        hidden=cfg.hidden,
        merge_train=cfg.merge_train,
        merge_eval=cfg.merge_eval,
        normalize_prototypes=cfg.normalize_prototypes,
        logit_scale_init=cfg.logit_scale_init,
        learn_logit_scale=cfg.learn_logit_scale,
        pooling=cfg.pooling,
        pool_top=cfg.pool_top,
    )
    net.matcher = ImgMatchNet(cfg.delta, cfg.threshold, cfg.fuse_weights, cfg.sim_size, cfg.mean, cfg.std)
    return net


def classnet_step(
    model: nn.Module,
    bank_encoder: nn.Module | None,
    batch: dict[str, torch.Tensor],
    cfg: ClassNetConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward of Eq. 6: ``alpha * L_CLS + beta * (theta1 * L_FGS + theta2 * L_BGS)``.

    ``batch``: ``image`` float [B,3,H,W] normalised with ``cfg.mean/std``, ``labels`` [B,N] multi-hot, both on
    the model's device. The caller runs backward (and AMP autocast: ``engine.training.loop.Trainer``). ``model`` may be
    DDP-wrapped: it is called through the wrapper, and only buffers are read from the inner module.
    """
    net = unwrap(model)
    x, y = batch["image"], batch["labels"].float()
    if y.ndim != 2 or y.shape[1] != net.n_classes:
        raise ValueError(f"labels must be [B, {net.n_classes}], got shape {tuple(y.shape)}")
    out = model(x)
    l_cls = L.classification_loss(out["logits"], y, cfg.level_weights)
    zero = l_cls.new_zeros(())
    l_fgs = l_bgs = penalty = zero
    n_sim = 0
    if cfg.use_sim and cfg.beta > 0 and bank_encoder is not None:
        if bank_encoder.training:
            freeze_encoder(bank_encoder)
        scales = out["scales"]
        cos_cams = [c / scales[i] for i, c in enumerate(out["cams"])]
        m = net.matcher(cos_cams, x, y, bank_encoder)
        n_sim = int(m["class_index"].numel())
        if n_sim:
            if m["f_fg"].shape[1] != net.prototypes.shape[1]:
                raise ValueError(
                    f"bank encoder features are {m['f_fg'].shape[1]}-d but the prototypes are "
                    f"{net.prototypes.shape[1]}-d: pass the encoder that built the bank"
                )
            l_fgs, l_bgs = L.similarity_losses(
                m["f_fg"],
                m["f_bg"],
                m["class_index"],
                net.prototypes,
                net.proto_class,
                tau=cfg.tau,
                variant=cfg.sim_loss,
            )
        if cfg.cam_penalty:
            penalty = cfg.cam_penalty * out["cams"][-1].float().mean()
    l_sim = cfg.theta1 * l_fgs + cfg.theta2 * l_bgs
    total = cfg.alpha * l_cls + cfg.beta * (l_sim + penalty)
    stats = {
        "l_cls": float(l_cls.detach()),
        "l_fgs": float(l_fgs.detach()),
        "l_bgs": float(l_bgs.detach()),
        "l_sim": float(l_sim.detach()),
        "total": float(total.detach()),
        "n_sim": float(n_sim),
    }
    return total, stats


def load_prototypes_from_bank(bank_dir: str | Path) -> tuple[torch.Tensor, list[int], list[str]]:
    """(prototypes [sum K, d], k_list, class_names) of a saved ``engine.prototypes.bank.Bank``."""
    from pbip_engine.engine.prototypes.bank import Bank  # another engineer's module; imported lazily

    bank = Bank.load(bank_dir)
    return (
        torch.as_tensor(np.asarray(bank.prototypes), dtype=torch.float32),
        list(bank.k),
        list(bank.class_names),
    )


__all__ = [
    "VARIANTS",
    "ClassNet",
    "ClassNetConfig",
    "ImgMatchNet",
    "build_classnet",
    "classnet_step",
    "freeze_encoder",
    "load_prototypes_from_bank",
    "unwrap",
]
