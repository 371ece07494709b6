"""Ray-free training core of the stage-2 segmenter: one step, one epoch, evaluation, checkpoints.

The lead's Ray Train loop (``jobs/``) calls exactly these functions per worker, so a local run
(:func:`fit_local`) and a distributed run share every line of the optimisation; a DDP-wrapped model
works unchanged. It mirrors ``train_classnet`` and shares its AMP policy (bf16 autocast on CUDA, fp16 +
GradScaler where bf16 is missing, nothing on CPU), input conversion and atomic checkpoint writer.

Batches are dicts ``{"image": uint8 B,H,W,3 (or normalised float B,3,H,W), "mask": B,H,W}`` or
``(image, mask)`` tuples. Masks follow the project convention (0 = background, k = class k) plus
``ignore_index`` (255) for pixels the pseudo-mask stage marks uncertain: they count in neither loss nor
metrics. Defaults follow DeepLab: SGD, momentum 0.9, weight decay 5e-4, poly(0.9) per iteration, head at
10x the backbone's learning rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.io.atomic import atomic_save, atomic_write_text, jsonable
from pbip_engine.engine.metrics import SegmentationMeter
from pbip_engine.engine.nn.deeplab import DeepLab, segmenter_from_config
from pbip_engine.engine.training.stage1 import (
    autocast,
    backward_step,
    latest_checkpoint,
    load_weights,
    read_checkpoint,
    restore_training_state,
    to_model_input,
)
from pbip_engine.methods.pbip.classnet import unwrap

IGNORE_INDEX = 255
CHECKPOINT_FORMAT = "pbip-segmenter/1"

Batch = Mapping[str, Any] | tuple[Any, Any]
Batches = Iterable[Batch] | Callable[[int], Iterable[Batch]]

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_LR",
    "IGNORE_INDEX",
    "SegTrainConfig",
    "SegTrainError",
    "base_lr",
    "batch_to_tensors",
    "evaluate",
    "fit_local",
    "iter_minibatches",
    "latest_checkpoint",
    "load_checkpoint",
    "load_segmenter",
    "make_optimizer",
    "make_scaler",
    "save_checkpoint",
    "segmentation_loss",
    "segmenter_step",
    "set_poly_lr",
    "train_one_epoch",
]


# Backbone learning rates of the reference recipes (SGD): DeepLab-v2's paper (batch 10; its summed ASPP
# diverges at 10x higher rates) and MLPS' DeepLab-v3+ stage 2 (batch 20).
DEFAULT_LR = {"deeplabv2": 2.5e-4, "deeplabv3plus": 1e-2}


class SegTrainError(ValueError):
    """Bad batch (shape, mask values), bad configuration, or an unusable checkpoint."""


@dataclass
class SegTrainConfig:
    """Optimisation settings; ``lr`` is the backbone's, the head gets ``lr * head_lr_mult``."""

    optimizer: str = "sgd"  # "sgd" (DeepLab) or "adamw"
    lr: float | None = None  # None = the architecture's published rate (DEFAULT_LR)
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    epochs: int = 20
    amp: bool = True  # only takes effect on CUDA
    ignore_index: int = IGNORE_INDEX
    hflip: bool = True
    vflip: bool = True
    grad_clip: float | None = None
    ignore_background: bool = False  # for validation metrics (see engine.metrics)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- plumbing


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_scaler(device: torch.device | str, amp: bool) -> torch.amp.GradScaler | None:
    """A GradScaler only where AMP runs in fp16 (CUDA without bf16); bf16 and fp32 need none."""
    dev = torch.device(device)
    if amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def base_lr(model: nn.Module, cfg: SegTrainConfig) -> float:
    """``cfg.lr``, or the published rate of the model's architecture when it is None."""
    if cfg.lr is not None:
        return float(cfg.lr)
    arch = getattr(unwrap(model), "config", {}).get("arch")
    if arch not in DEFAULT_LR:
        raise SegTrainError(f"no default learning rate for model arch {arch!r}: set SegTrainConfig.lr")
    return DEFAULT_LR[arch]


def make_optimizer(model: nn.Module, cfg: SegTrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: pretrained backbone at ``lr``, new head at ``lr * head_lr_mult``.

    Each group remembers its base rate in ``initial_lr`` for :func:`set_poly_lr`.
    """
    m = unwrap(model)
    lr = base_lr(model, cfg)
    if isinstance(m, DeepLab):
        groups = [
            {"params": m.backbone_parameters(), "lr": lr, "name": "backbone"},
            {"params": m.head_parameters(), "lr": lr * cfg.head_lr_mult, "name": "head"},
        ]
    else:
        groups = [{"params": list(model.parameters()), "lr": lr, "name": "all"}]
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    raise SegTrainError(f"unknown optimizer {cfg.optimizer!r}; choose 'sgd' or 'adamw'")


def set_poly_lr(
    optimizer: torch.optim.Optimizer, step: int, total_steps: int | None, power: float = 0.9
) -> float:
    """lr = initial_lr * (1 - step/total_steps)^power for every group; returns the first group's lr.

    Stateless (a function of the global step), so resuming from a checkpoint's step needs no scheduler
    state. ``total_steps=None`` keeps the base rate (the epoch length is not known yet).
    """
    factor = 1.0 if not total_steps else max(0.0, 1.0 - min(step, total_steps) / total_steps) ** power
    for g in optimizer.param_groups:
        g["lr"] = g.get("initial_lr", g["lr"]) * factor
    return float(optimizer.param_groups[0]["lr"])


# -------------------------------------------------------------------------------------------- batches


def batch_to_tensors(
    batch: Batch,
    device: torch.device | str,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    n_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    hflip: bool = False,
    vflip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image ``B,3,H,W`` float normalised, mask ``B,H,W`` long) on ``device``.

    The image goes through ``train_classnet.to_model_input`` (uint8 is normalised on the device, float
    is taken as normalised). Mask values must be 0..n_classes-1 or ``ignore_index``: a stray value is a
    data bug, not something to train on. Random flips hit image and mask together, per sample.
    """
    if isinstance(batch, Mapping):
        if "image" not in batch or "mask" not in batch:
            raise SegTrainError(f"batch needs keys 'image' and 'mask', got {sorted(batch)}")
        image, mask = batch["image"], batch["mask"]
    else:
        image, mask = batch
    try:
        x = to_model_input({"image": image}, mean, std, device)["image"]
    except ValueError as e:
        raise SegTrainError(str(e)) from e
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    if m.ndim == 2:
        m = m[None]
    if tuple(m.shape) != (x.shape[0], x.shape[2], x.shape[3]):
        raise SegTrainError(f"mask shape {tuple(m.shape)} does not match image {tuple(x.shape)} (B,3,H,W)")
    if n_classes is not None and m.device.type == "cpu" and m.numel():
        bad = (m >= n_classes) & (m != ignore_index)
        if bool(bad.any()):
            vals = sorted(int(v) for v in torch.unique(m[bad]))[:8]
            raise SegTrainError(
                f"mask values {vals} are neither classes 0..{n_classes - 1} nor ignore_index {ignore_index}"
            )
    m = m.to(x.device, non_blocking=True).long()
    if hflip or vflip:  # the conversions may have returned the caller's own tensors: never flip those
        x, m = x.clone(), m.clone()
    for flag, dim in ((hflip, 3), (vflip, 2)):
        if not flag:
            continue
        sel = (torch.rand(x.shape[0], generator=generator) < 0.5).nonzero().flatten()
        if sel.numel():
            sel = sel.to(x.device)
            x[sel] = x[sel].flip(dim)
            m[sel] = m[sel].flip(dim - 1)
    return x, m


def segmentation_loss(
    logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel-mean cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored."""
    if bool((mask != ignore_index).any()):
        return F.cross_entropy(logits.float(), mask, ignore_index=ignore_index)
    return logits.float().sum() * 0.0


# ------------------------------------------------------------------------------------------- training


def segmenter_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    cfg: SegTrainConfig | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimisation step on one batch; returns ``loss``, ``lr`` (backbone group), ``pixels``, ``images``.

    The model's ``config`` supplies the normalisation and the class count used to validate masks.
    """
    cfg = cfg or SegTrainConfig()
    mcfg = getattr(unwrap(model), "config", {})
    device = model_device(model)
    image, mask = batch_to_tensors(
        batch,
        device,
        mean=tuple(mcfg.get("mean", (0.0, 0.0, 0.0))),
        std=tuple(mcfg.get("std", (1.0, 1.0, 1.0))),
        n_classes=mcfg.get("n_classes"),
        ignore_index=cfg.ignore_index,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        generator=generator,
    )
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits = model(image)
    loss = segmentation_loss(logits, mask, cfg.ignore_index)
    if not torch.isfinite(loss):
        raise SegTrainError(f"non-finite loss {loss.item()} (lr {optimizer.param_groups[0]['lr']:.3g})")
    backward_step(loss, model, optimizer, scaler, cfg.grad_clip)
    return {
        "loss": float(loss.detach()),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "pixels": float((mask != cfg.ignore_index).sum()),
        "images": float(image.shape[0]),
    }


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    cfg: SegTrainConfig | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    log_every: int = 50,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """``segmenter_step`` over ``batches`` with the poly LR at global step ``start_step + i``.

    Returns the pixel-weighted mean loss, steps, images, seconds, images/s and the last lr.
    """
    import time

    cfg = cfg or SegTrainConfig()
    t0 = time.perf_counter()
    steps, images, loss_sum, pix_sum = 0, 0, 0.0, 0.0
    for batch in batches:
        if max_steps is not None and steps >= max_steps:
            break
        set_poly_lr(optimizer, start_step + steps, total_steps, cfg.poly_power)
        out = segmenter_step(model, batch, optimizer, cfg, scaler=scaler, generator=generator)
        steps += 1
        images += int(out["images"])
        loss_sum += out["loss"] * out["pixels"]
        pix_sum += out["pixels"]
        if log_fn is not None and log_every and steps % log_every == 0:
            log_fn(f"step {start_step + steps}: loss {out['loss']:.4f} lr {out['lr']:.3g}")
    dt = time.perf_counter() - t0
    return {
        "loss": loss_sum / pix_sum if pix_sum else math.nan,
        "steps": steps,
        "images": images,
        "seconds": dt,
        "images_per_s": images / dt if dt > 0 else 0.0,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    ignore_background: bool = False,
    amp: bool = True,
    boundary: bool = False,
) -> dict[str, Any]:
    """mIoU/Dice/FwIoU (engine.metrics) of the argmax prediction over (image, mask) batches.

    Truth pixels of 255 (any value > N) are ignored by the confusion matrix; the scored classes are the
    tissue classes 1..N, background 0 counting through false positives unless ``ignore_background``.
    """
    mcfg = getattr(unwrap(model), "config", {})
    if "n_classes" not in mcfg:
        raise SegTrainError("evaluate() needs a segmenter with config['n_classes'] (build_segmenter sets it)")
    meter = SegmentationMeter(
        int(mcfg["n_classes"]) - 1, ignore_background=ignore_background, boundary=boundary
    )
    device = model_device(model)
    model.eval()
    for batch in data:
        image, mask = batch_to_tensors(batch, device, mean=tuple(mcfg["mean"]), std=tuple(mcfg["std"]))
        with autocast(device, amp):
            pred = model(image).argmax(1)
        meter.update(pred.to(torch.uint8).cpu().numpy(), mask.cpu().numpy())
    return meter.compute()


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    metrics: Mapping[str, Any],
    *,
    step: int = 0,
    cfg: SegTrainConfig | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Atomically write weights + ``model.config`` (enough to rebuild the model) + resume state."""
    base = unwrap(model)
    if not hasattr(base, "config"):
        raise SegTrainError(f"{path}: model has no .config; build it with build_segmenter()")
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_config": jsonable(dict(base.config)),
        "model": base.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "metrics": jsonable(dict(metrics)),
        "config": jsonable(cfg.to_dict()) if cfg is not None else None,
    }
    p = Path(path)
    atomic_save(p, lambda tmp: torch.save(state, tmp))
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict :func:`save_checkpoint` wrote (``weights_only`` load); errors name the file."""
    return read_checkpoint(
        path, CHECKPOINT_FORMAT, map_location=map_location, error=SegTrainError, what="segmenter checkpoint"
    )


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> DeepLab:
    """Rebuild the checkpoint's segmenter from its stored config and load its weights (eval mode)."""
    state = load_checkpoint(path)
    model = segmenter_from_config(state["model_config"])
    load_weights(Path(path), model, state["model"], error=SegTrainError)
    return model.to(device).eval()


def resume_from(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore weights (+ optimiser/scaler) in place; returns ``{"epoch", "step", "metrics", "config"}``."""
    p = Path(path)
    state = load_checkpoint(p, map_location)
    restore_training_state(p, state, model, optimizer, scaler, error=SegTrainError)
    return {k: state.get(k) for k in ("epoch", "step", "metrics", "config")}


# -------------------------------------------------------------------------------------------- local fit


def iter_minibatches(
    images: np.ndarray, masks: np.ndarray, batch_size: int, *, shuffle: bool = True, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """uint8 ``N,H,W,3`` images + ``N,H,W`` masks -> (shuffled) ``{"image", "mask"}`` batches."""
    if len(images) != len(masks):
        raise SegTrainError(f"{len(images)} images but {len(masks)} masks")
    order = np.random.default_rng(seed).permutation(len(images)) if shuffle else np.arange(len(images))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield {"image": images[idx], "mask": masks[idx]}


def _epoch_batches(data: Batches, epoch: int) -> Iterable[Batch]:
    return data(epoch) if callable(data) else data


def fit_local(
    model: nn.Module,
    train_data: Batches,
    cfg: SegTrainConfig,
    out_dir: str | Path,
    *,
    val_data: Batches | None = None,
    device: torch.device | str = "cpu",
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    resume: bool = True,
    keep_last: int = 2,
    seed: int = 0,
    log_fn: Callable[[str], None] | None = print,
    log_every: int = 50,
    max_steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Single-process training with the same files as ``train_classnet.fit_local``.

    ``train_data``/``val_data``: a re-iterable of batches or ``epoch -> iterable``. The poly schedule
    spans ``epochs * steps_per_epoch`` steps; without ``steps_per_epoch`` it is counted in epoch 1 (which
    then runs at the base rate). Writes ``out_dir/checkpoints/epoch_NNNN.pt`` (last ``keep_last``),
    ``out_dir/best.pt`` (best val mIoU; the last epoch without val), ``metrics.jsonl``, ``config.json``;
    resumes from the latest epoch checkpoint when ``resume``.
    """
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    model.to(dev)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    epochs = cfg.epochs if epochs is None else epochs
    optimizer = make_optimizer(model, cfg)
    scaler = make_scaler(dev, cfg.amp)
    atomic_write_text(
        out / "config.json",
        json.dumps(
            jsonable({"train": cfg.to_dict(), "model": getattr(unwrap(model), "config", {})}), indent=2
        ),
    )

    start, best, step = 1, -math.inf, 0
    history: list[dict[str, Any]] = []
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        info = resume_from(latest, model, optimizer, scaler=scaler, map_location=dev)
        start, step = int(info["epoch"]) + 1, int(info["step"] or 0)
        best = float((info["metrics"] or {}).get("best_miou") or -math.inf)
        steps_per_epoch = steps_per_epoch or (step // max(1, start - 1))
        if log_fn:
            log_fn(f"resumed from {latest} (epoch {info['epoch']}, step {step})")
        metrics_path = out / "metrics.jsonl"
        if metrics_path.is_file():
            history = [json.loads(s) for s in metrics_path.read_text().splitlines() if s.strip()]
            history = [h for h in history if h.get("epoch", 0) < start]

    for epoch in range(start, epochs + 1):
        total = epochs * steps_per_epoch if steps_per_epoch else None
        train_stats = train_one_epoch(
            model, _epoch_batches(train_data, epoch), optimizer, cfg, scaler=scaler, start_step=step,
            total_steps=total, max_steps=max_steps_per_epoch, generator=gen, log_every=log_every, log_fn=log_fn,
        )  # fmt: skip
        step += int(train_stats["steps"])
        steps_per_epoch = steps_per_epoch or int(train_stats["steps"])
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train": train_stats}
        is_best = val_data is None
        if val_data is not None:
            val = evaluate(
                model, _epoch_batches(val_data, epoch), ignore_background=cfg.ignore_background, amp=cfg.amp
            )
            record["val"] = val
            if not math.isnan(val["miou"]) and val["miou"] > best:
                best, is_best = val["miou"], True
        record["best_miou"] = best if math.isfinite(best) else None
        path = save_checkpoint(
            ckpt_dir / f"epoch_{epoch:04d}.pt",
            model,
            optimizer,
            epoch,
            record,
            step=step,
            cfg=cfg,
            scaler=scaler,
        )
        if is_best:
            save_checkpoint(out / "best.pt", model, None, epoch, record, step=step, cfg=cfg)
        for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep_last] if keep_last > 0 else []:
            if old != path:
                old.unlink(missing_ok=True)
        history.append(jsonable(record))
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        if log_fn:
            msg = f"epoch {epoch}/{epochs}: loss {train_stats['loss']:.4f}"
            if "val" in record:
                msg += f" val mIoU {record['val']['miou']:.4f} (best {best:.4f})"
            log_fn(msg)
    return {
        "epochs_run": max(0, epochs - start + 1),
        "best_miou": best if math.isfinite(best) else None,
        "history": history,
        "out_dir": str(out),
        "best_path": str(out / "best.pt"),
    }
