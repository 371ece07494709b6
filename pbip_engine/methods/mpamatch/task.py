"""MPAMatch's training step as a loop task: UniMatch weak-to-strong consistency + image and text prototype contrasts.

A batch mixes labelled tiles (mask) and unlabelled ones (``labelled`` False). One forward of labelled +
weak unlabelled images (with UniMatch's feature-perturbed copy of the weak ones) gives the supervised
logits, the pseudo labels (confidence >= ``threshold``) and the FP stream; one forward of the two strong
views (kornia colour jitter / grey / blur, then CutMix within the unlabelled part, pseudo labels mixed
alike) learns from them. Pixel embeddings of labelled pixels and of the first strong view's confident
pixels are contrasted with the EMA image prototypes and with the projected text prompts.

The task is a ``SegmentationTask`` (same checkpoint kind, same mIoU validation), so the segment stage
loads its best epoch like any stage-2 model; the text tower stays frozen outside DDP and the optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.training.inputs import unwrap
from pbip_engine.engine.training.segmentation import SegmentationTask, batch_to_tensors, segmentation_loss
from pbip_engine.methods.mpamatch.config import MpaMatchConfig
from pbip_engine.methods.mpamatch.losses import (
    dice_loss,
    labels_at,
    masked_ce,
    pixels,
    prototype_contrast,
    sample,
    update_prototypes,
)


def strong_augment() -> nn.Module:
    """UniMatch's strong photometric view (colour jitter p=0.8, grey p=0.2, blur p=0.5) on [0, 1] images."""
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.ColorJiggle(0.5, 0.5, 0.5, 0.25, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((7, 7), (0.1, 2.0), p=0.5),
    )


def cutmix_boxes(n: int, h: int, w: int, p: float = 0.5, device: Any = "cpu") -> torch.Tensor:
    """Per-sample boolean CutMix boxes (UniMatch: area 2–40 %, aspect 0.3–3.3, applied with probability ``p``)."""
    out = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for i in range(n):
        if float(torch.rand(())) > p:
            continue
        area = float(torch.empty(()).uniform_(0.02, 0.4)) * h * w
        ratio = float(torch.empty(()).uniform_(0.3, 1 / 0.3))
        bh, bw = min(h, int((area * ratio) ** 0.5)), min(w, int((area / ratio) ** 0.5))
        y, x = int(torch.randint(0, h - bh + 1, ())), int(torch.randint(0, w - bw + 1, ()))
        out[i, y : y + bh, x : x + bw] = True
    return out


class MpaMatchTask(SegmentationTask):
    """``forward(batch)``: the MPAMatch loss (parts off per config) and its logged terms."""

    def __init__(self, model: nn.Module, cfg: MpaMatchConfig, class_names: list[str],
                 text_tower: nn.Module | None = None, *, amp: bool = True) -> None:  # fmt: skip
        super().__init__(model, amp=amp)
        self.cfg = cfg
        self.strong = strong_augment() if cfg.semi else None
        self._frozen = [text_tower] if text_tower is not None else []
        if cfg.text_prototypes and text_tower is None:
            raise ValueError("text_prototypes needs a text tower")
        from pbip_engine.methods.mpamatch.text import class_prompts

        self.prompts = class_prompts(cfg.prompt, class_names)
        self._fixed_text: torch.Tensor | None = None

    def _apply(self, fn, *args, **kwargs):  # .to() moves the frozen text tower too
        for m in self._frozen:
            m._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    # -- batches ---------------------------------------------------------------------------------------

    def prepare(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        c = self._cfg
        mean = torch.tensor(c["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(c["std"], device=device).view(1, 3, 1, 1)
        x, m = batch_to_tensors(batch, device, mean=tuple(c["mean"]), std=tuple(c["std"]),
                                n_classes=c.get("n_classes"), ignore_index=self.ignore_index)  # fmt: skip
        lab = batch.get("labelled")
        lab = torch.ones(len(x), dtype=torch.bool) if lab is None else torch.as_tensor(lab).bool().reshape(-1)
        out = {"image": x, "mask": m, "labelled": lab.to(device)}
        if self.strong is not None and self.training and bool((~lab).any()):
            xu = x[~lab.to(device)] * std + mean  # back to [0, 1] for kornia
            n, _, h, w = xu.shape
            for k in (1, 2):
                s = self.strong(xu.clamp(0, 1))
                box = cutmix_boxes(n, h, w, device=device)
                perm = torch.roll(torch.arange(n, device=device), 1)
                s = torch.where(box[:, None], s[perm], s)
                out[f"s{k}"], out[f"box{k}"], out[f"perm{k}"] = (s - mean) / std, box, perm
        return out

    def _text_prototypes(self) -> torch.Tensor:
        model = unwrap(self.model)
        tower = self._frozen[0]
        ctx = model.text_ctx if getattr(tower, "takes_context", False) else None
        if ctx is None:
            if self._fixed_text is None:
                with torch.no_grad():
                    self._fixed_text = tower(self.prompts, None).float()
            feats = self._fixed_text
        else:
            feats = tower(self.prompts, ctx).float()
        return F.normalize(model.text_proj(feats.to(model.text_proj.weight.dtype)), dim=1)

    # -- the step --------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        x, mask, lab = batch["image"], batch["mask"], batch["labelled"]
        need_emb = cfg.image_prototypes or cfg.text_prototypes
        semi = "s1" in batch
        nl = int(lab.sum())
        xs = torch.cat([x[lab], x[~lab]]) if semi else x[lab]
        stats: dict[str, Any] = {}
        if not len(xs):
            return {"loss": sum(p.sum() * 0.0 for p in self.model.parameters())}
        out = self.model(xs, fp=semi and cfg.consistency, with_emb=need_emb)
        logits = out if torch.is_tensor(out) else out["logits"]
        y_l = mask[lab]
        sup = segmentation_loss(logits[:nl], y_l, self.ignore_index) if nl else logits.sum() * 0.0
        if cfg.dice and nl:
            sup = sup + dice_loss(logits[:nl], y_l, self.ignore_index)
        loss, stats["sup"] = sup, float(sup.detach())
        emb_pix, lab_pix = [], []
        if need_emb and nl:
            e_l = out["emb"][:nl]
            emb_pix.append(e_l)
            lab_pix.append(labels_at(y_l, e_l.shape[-2:]))
        if semi:
            with torch.no_grad():
                prob = logits[nl:].detach().float().softmax(1)
                conf, pl = prob.max(1)
            keep = conf >= cfg.threshold
            stats["mask_ratio"] = float(keep.float().mean())
            if cfg.consistency:
                so = self.model(torch.cat([batch["s1"], batch["s2"]]), with_emb=need_emb)
                s_logits = so if torch.is_tensor(so) else so["logits"]
                nu = len(pl)
                terms = []
                for k, part in ((1, s_logits[:nu]), (2, s_logits[nu:])):
                    box, perm = batch[f"box{k}"], batch[f"perm{k}"]
                    pl_k = torch.where(box, pl[perm], pl)
                    keep_k = torch.where(box, keep[perm], keep)
                    terms.append(masked_ce(part, pl_k, keep_k))
                    if k == 1 and need_emb:
                        e_s = so["emb"][:nu]
                        y_s = labels_at(
                            torch.where(keep_k, pl_k, torch.full_like(pl_k, IGNORE_INDEX)), e_s.shape[-2:]
                        )
                        emb_pix.append(e_s)
                        lab_pix.append(y_s)
                fp = masked_ce(out["fp"][nl:], pl, keep)
                stats.update(
                    u_s1=float(terms[0].detach()), u_s2=float(terms[1].detach()), u_fp=float(fp.detach())
                )
                loss = (sup + 0.25 * terms[0] + 0.25 * terms[1] + 0.5 * fp) / 2.0
            elif need_emb:  # contrasts without the strong views: the weak view's confident pixels
                e_w = out["emb"][nl:]
                y_w = torch.where(keep, pl, torch.full_like(pl, IGNORE_INDEX))
                emb_pix.append(e_w)
                lab_pix.append(labels_at(y_w, e_w.shape[-2:]))
        if need_emb:
            if emb_pix:
                e, y = [], []
                for em, yy in zip(emb_pix, lab_pix, strict=True):
                    a, b = pixels(em, yy)
                    e.append(a)
                    y.append(b)
                e_all, y_all = sample(torch.cat(e), torch.cat(y), cfg.max_pixels)
            else:  # nothing to contrast here; the prototype update below still joins the other workers
                e_all = out["emb"].new_zeros((0, out["emb"].shape[1]))
                y_all = mask.new_zeros((0,))
            model = unwrap(self.model)
            if cfg.image_prototypes:
                update_prototypes(
                    model.prototypes, model.proto_seen, e_all.detach(), y_all, cfg.proto_momentum
                )
                li = prototype_contrast(e_all, y_all, model.prototypes, cfg.temperature, model.proto_seen)
                loss = loss + cfg.w_image * li
                stats["img"] = float(li.detach())
            if cfg.text_prototypes:
                lt = prototype_contrast(e_all, y_all, self._text_prototypes(), cfg.temperature)
                loss = loss + cfg.w_text * lt
                stats["txt"] = float(lt.detach())
        return {"loss": loss, **stats}

    def param_groups(self) -> list[dict[str, Any]]:
        """The pretrained encoder at the base rate; decoder, heads and prompt parts at ``head_lr_mult``."""
        m = unwrap(self.model)
        return [
            {"params": m.backbone_parameters(), "name": "backbone"},
            {"params": m.head_parameters(), "name": "head", "lr_mult": self.head_lr_mult},
        ]
