"""Ray-free stage-1 training pieces: input conversion, optimiser, epoch loop, CAM evaluation, checkpoints.

The lead's Ray Train job calls these inside ``TorchTrainer`` workers (the model may be DDP-wrapped; nothing
here assumes rank 0). ``fit_local`` is a single-process loop for tests and GPU hosts without Ray.

Batch convention: loaders yield dicts with ``image`` = uint8 RGB ``B,H,W,3`` (numpy or tensor) and
``labels`` = multi-hot ``B,N``; validation batches add ``mask`` = uint8 ``B,H,W`` (0 = background, k =
class k). ``to_model_input`` moves the uint8 batch to the device (1 byte/px) and normalises there with
``cfg.mean/std``. A float ``B,3,H,W`` ``image`` is taken as already normalised.

AMP runs on CUDA only: bf16 autocast where supported (no scaler needed), else fp16 with a GradScaler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pbip_engine.engine.io.atomic import atomic_save, atomic_write_text, jsonable
from pbip_engine.engine.metrics import SegmentationMeter
from pbip_engine.engine.pseudo.cams import cams_to_mask, fuse_cams
from pbip_engine.methods.pbip.classnet import ClassNetConfig, classnet_step, freeze_encoder, unwrap

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pbip-classnet/1"
Batches = Iterable[dict[str, Any]] | Callable[[int], Iterable[dict[str, Any]]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------------------------- inputs


def to_model_input(
    batch: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """uint8 ``B,H,W,3`` (or normalised float ``B,3,H,W``) + labels -> normalised float tensors on ``device``."""
    if "image" not in batch:
        raise KeyError(f"batch has no 'image' key (keys: {sorted(batch)})")
    img = torch.as_tensor(
        np.asarray(batch["image"]) if not torch.is_tensor(batch["image"]) else batch["image"]
    )
    dev = torch.device(device)
    if img.dtype == torch.uint8:
        if img.ndim == 3:
            img = img.unsqueeze(0)
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"uint8 images must be B,H,W,3 RGB, got shape {tuple(img.shape)}")
        img = img.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        img = (img - m) / s
    elif img.is_floating_point():
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"float images must be normalised B,3,H,W, got shape {tuple(img.shape)}")
        img = img.to(dev, non_blocking=True).float()
    else:
        raise ValueError(f"image must be uint8 B,H,W,3 or float B,3,H,W, got dtype {img.dtype}")
    out = {"image": img}
    if "labels" in batch:
        lab = batch["labels"]
        out["labels"] = torch.as_tensor(np.asarray(lab) if not torch.is_tensor(lab) else lab).to(dev).float()
    return out


def rgb_uint8(batch: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The batch's images as uint8 ``B,H,W,3`` RGB (denormalising float input)."""
    img = batch["image"]
    arr = img.detach().cpu() if torch.is_tensor(img) else torch.as_tensor(np.asarray(img))
    if arr.dtype == torch.uint8:
        return arr.numpy() if arr.ndim == 4 else arr.numpy()[None]
    x = arr.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 (or fp16) autocast on CUDA when enabled; a no-op elsewhere."""
    dev = torch.device(device)
    if not enabled or dev.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_grad_scaler(cfg: ClassNetConfig, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler only where AMP uses fp16 (CUDA without bf16)."""
    dev = torch.device(device)
    if cfg.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def make_optimizer(model: nn.Module, cfg: ClassNetConfig) -> torch.optim.AdamW:
    """AdamW (cfg.lr, cfg.weight_decay); no decay on biases, norm weights and logit scales (all < 2-D)."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


# ------------------------------------------------------------------------------------------------ train


def backward_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """Backward + optional gradient clipping + optimiser step, through the AMP scaler when there is one."""
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    bank_encoder: nn.Module | None,
    batches: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    cfg: ClassNetConfig,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    log_every: int = 50,
    log_fn: Callable[[str], None] | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the mean of each loss term, steps, images and images/s."""
    model.train()
    if bank_encoder is not None:
        freeze_encoder(bank_encoder)
    sums: dict[str, float] = {}
    steps = images = 0
    t0 = time.perf_counter()
    for step, raw in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        batch = to_model_input(raw, cfg.mean, cfg.std, device)
        with autocast(device, cfg.amp):
            loss, stats = classnet_step(model, bank_encoder, batch, cfg)
        if not math.isfinite(stats["total"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {stats}")
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, model, optimizer, scaler, cfg.grad_clip)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        images += int(batch["image"].shape[0])
        if log_fn is not None and log_every and step % log_every == 0:
            log_fn(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
    seconds = time.perf_counter() - t0
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out.update(
        steps=steps, images=images, seconds=seconds, images_per_s=images / seconds if seconds > 0 else 0.0
    )
    return out


# ----------------------------------------------------------------------------------------- pseudo masks


@torch.inference_mode()
def predict_masks(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: ClassNetConfig,
    device: torch.device | str,
    background: str | None = None,
    *,
    use_labels: bool = True,
    label_gate: float = 0.5,
    **mask_kw: Any,
) -> tuple[np.ndarray, torch.Tensor]:
    """Pseudo masks (uint8 ``B,H,W``, 0 = background) and fused CAMs ``B,N,H,W`` for one batch.

    ``use_labels=True`` restricts to the batch's image labels (PBIP's "oracle" labels at val/test, the
    filename labels on train); otherwise the last level's sigmoid > ``label_gate`` decides.
    """
    was_training = model.training
    model.eval()
    try:
        inp = to_model_input(batch, cfg.mean, cfg.std, device)
        with autocast(device, cfg.amp):
            out = model(inp["image"])
        h, w = inp["image"].shape[-2:]
        fused = fuse_cams(out["cams"], (h, w), cfg.eval_fuse_weights)
        if use_labels:
            if "labels" not in inp:
                raise KeyError("use_labels=True needs 'labels' in the batch")
            labels = inp["labels"]
        else:
            labels = (torch.sigmoid(out["logits"][-1].float()) > label_gate).float()
        bg = background or cfg.eval_background
        rgb = rgb_uint8(batch, cfg.mean, cfg.std) if "white" in bg else None
        masks = cams_to_mask(fused, labels, bg, rgb=rgb, **mask_kw)
        return masks, fused
    finally:
        model.train(was_training)


def evaluate_cams(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    cfg: ClassNetConfig,
    device: torch.device | str,
    n_classes: int,
    background: str | None = None,
    ignore_background: bool | None = None,
    *,
    use_labels: bool = True,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Pseudo-mask quality on batches with ``mask``: mIoU/FwIoU/Dice/bIoU from one confusion matrix.

    ``background``/``ignore_background`` default to ``cfg.eval_background``/``cfg.eval_ignore_background``;
    both are recorded in the result.
    """
    ib = cfg.eval_ignore_background if ignore_background is None else ignore_background
    bg = background or cfg.eval_background
    meter = SegmentationMeter(n_classes, ignore_background=ib)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if "mask" not in batch:
            raise KeyError(f"evaluation batch {i} has no 'mask' (keys: {sorted(batch)})")
        masks, _ = predict_masks(model, batch, cfg, device, bg, use_labels=use_labels)
        truth = np.asarray(batch["mask"].cpu() if torch.is_tensor(batch["mask"]) else batch["mask"])
        meter.update(masks, truth.reshape(masks.shape))
    out = meter.compute()
    out["background"] = bg
    out["oracle_labels"] = use_labels
    return out


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    metrics: dict[str, Any],
    *,
    cfg: ClassNetConfig | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write model (+ optimiser, scaler) state, epoch, metrics and config atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "metrics": jsonable(metrics),
        "config": jsonable(cfg.to_dict()) if cfg is not None else None,
    }
    p = Path(path)
    atomic_save(p, lambda tmp: torch.save(state, tmp))
    return p


def read_checkpoint(
    path: str | Path,
    fmt: str,
    *,
    map_location: str | torch.device = "cpu",
    error: type[Exception] = CheckpointError,
    what: str = "checkpoint",
) -> dict[str, Any]:
    """A ``weights_only`` checkpoint dict of format ``fmt``; every failure names the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise error(f"could not read checkpoint {p}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(f"{p} is not a {fmt} checkpoint")
    return state


def load_weights(
    p: Path, model: nn.Module, sd: Any, *, error: type[Exception] = CheckpointError, hint: str = ""
) -> None:
    """Strict load into the unwrapped model; the first shape mismatch or key difference is named."""
    net = unwrap(model)
    own = net.state_dict()
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise error(
            f"{p}: tensor {k!r} has shape {tuple(sd[k].shape)}, the model expects {tuple(own[k].shape)}{hint}"
        )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise error(f"{p}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    net.load_state_dict(sd)


def restore_training_state(
    p: Path,
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    error: type[Exception] = CheckpointError,
    hint: str = "",
) -> None:
    """Weights (strict, see :func:`load_weights`), then the optimiser and scaler where both sides have one."""
    load_weights(p, model, state["model"], error=error, hint=hint)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore a ``save_checkpoint`` file into ``model`` (strict) and optionally the optimiser/scaler.

    Returns ``{"epoch", "metrics", "config"}``. Mismatches (another bank, another backbone) raise a
    ``CheckpointError`` naming the file and the first offending tensors.
    """
    p = Path(path)
    state = read_checkpoint(p, CHECKPOINT_FORMAT, map_location=map_location)
    restore_training_state(p, state, model, optimizer, scaler, hint=" (different bank/backbone/classes?)")
    return {"epoch": state["epoch"], "metrics": state.get("metrics") or {}, "config": state.get("config")}


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The ``epoch_NNNN.pt`` with the highest epoch in ``ckpt_dir`` (None if there is none)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    found = [
        (int(m.group(1)), f) for f in d.glob("epoch_*.pt") if (m := re.fullmatch(r"epoch_(\d+)\.pt", f.name))
    ]
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------- local loop


def _epoch_batches(data: Batches, epoch: int) -> Iterable[dict[str, Any]]:
    return data(epoch) if callable(data) else data


def fit_local(
    model: nn.Module,
    bank_encoder: nn.Module | None,
    train_data: Batches,
    cfg: ClassNetConfig,
    out_dir: str | Path,
    *,
    val_data: Batches | None = None,
    n_classes: int | None = None,
    device: torch.device | str = "cpu",
    epochs: int | None = None,
    resume: bool = True,
    keep_last: int = 2,
    log_fn: Callable[[str], None] | None = print,
    log_every: int = 50,
    max_steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Single-process training: checkpoint every epoch, resume from the latest, keep the best by val mIoU.

    ``train_data``/``val_data``: a re-iterable of batches or ``epoch -> iterable`` (for per-epoch shuffles).
    Writes ``out_dir/checkpoints/epoch_NNNN.pt`` (the last ``keep_last``), ``out_dir/best.pt``,
    ``out_dir/metrics.jsonl`` (one JSON object per epoch) and ``out_dir/config.json``.
    """
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    model.to(dev)
    if bank_encoder is not None:
        freeze_encoder(bank_encoder.to(dev))
    n_classes = n_classes or unwrap(model).n_classes
    epochs = cfg.epochs if epochs is None else epochs
    optimizer = make_optimizer(model, cfg)
    scaler = make_grad_scaler(cfg, dev)
    atomic_write_text(out / "config.json", json.dumps(jsonable(cfg.to_dict()), indent=2))

    start, best = 1, -math.inf
    history: list[dict[str, Any]] = []
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        info = load_checkpoint(latest, model, optimizer, scaler=scaler, map_location=dev)
        start = info["epoch"] + 1
        best = float(info["metrics"].get("best_miou", -math.inf) or -math.inf)
        if log_fn:
            log_fn(f"resumed from {latest} (epoch {info['epoch']})")
    metrics_path = out / "metrics.jsonl"
    if metrics_path.is_file():
        history = [json.loads(s) for s in metrics_path.read_text().splitlines() if s.strip()]
        history = [h for h in history if h.get("epoch", 0) < start]

    for epoch in range(start, epochs + 1):
        train_stats = train_one_epoch(
            model, bank_encoder, _epoch_batches(train_data, epoch), optimizer, cfg, dev, scaler,
            log_every=log_every, log_fn=log_fn, max_steps=max_steps_per_epoch,
        )  # fmt: skip
        record: dict[str, Any] = {"epoch": epoch, "train": train_stats}
        is_best = False
        if val_data is not None:
            val = evaluate_cams(model, _epoch_batches(val_data, epoch), cfg, dev, n_classes)
            record["val"] = val
            if not math.isnan(val["miou"]) and val["miou"] > best:
                best, is_best = val["miou"], True
        record["best_miou"] = best if math.isfinite(best) else None
        path = save_checkpoint(
            ckpt_dir / f"epoch_{epoch:04d}.pt", model, optimizer, epoch, record, cfg=cfg, scaler=scaler
        )
        if is_best:
            save_checkpoint(out / "best.pt", model, None, epoch, record, cfg=cfg)
        for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep_last] if keep_last > 0 else []:
            if old != path:
                old.unlink(missing_ok=True)
        history.append(jsonable(record))
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
        if log_fn:
            msg = f"epoch {epoch}/{epochs}: loss {train_stats.get('total', float('nan')):.4f}"
            if "val" in record:
                msg += f" val mIoU {record['val']['miou']:.4f} (best {best:.4f})"
            log_fn(msg)
    return {
        "epochs_run": max(0, epochs - start + 1),
        "best_miou": best if math.isfinite(best) else None,
        "history": history,
        "out_dir": str(out),
    }
