"""Stage 2 of every method: a fully supervised segmenter trained on pseudo masks, as a loop task.

Masks follow the project convention (0 = background, k = class k) plus ``IGNORE_INDEX`` (255) for pixels
the pseudo-mask stage leaves uncertain: they count in neither the loss nor the metrics. The head gets
``head_lr_mult`` times the backbone's rate (DeepLab's recipe: a pretrained backbone, a new head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pbip_engine.engine.metrics import IGNORE_INDEX, SegmentationMeter
from pbip_engine.engine.nn.deeplab import DeepLab, segmenter_from_config
from pbip_engine.engine.training.amp import autocast
from pbip_engine.engine.training.checkpoint import load_weights, read_checkpoint
from pbip_engine.engine.training.inputs import to_model_input, unwrap
from pbip_engine.engine.training.task import TrainTask

KIND = "segmenter"


class SegTrainError(ValueError):
    """Bad batch (shape, mask values) or an unusable segmenter checkpoint."""


def batch_to_tensors(
    batch: Mapping[str, Any] | tuple[Any, Any],
    device: torch.device | str,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    n_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image ``B,3,H,W`` float normalised, mask ``B,H,W`` long) on ``device``.

    Mask values must be 0..n_classes-1 or ``ignore_index``: a stray value is a data bug, not something
    to train on.
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
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(mask))
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
    return x, m.to(x.device, non_blocking=True).long()


def segmentation_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-mean cross-entropy over non-ignored pixels (with ``weight`` per class: the weighted mean, as
    torch computes it); 0 (with a graph) when every pixel is ignored."""
    if bool((mask != ignore_index).any()):
        w = None if weight is None else weight.to(logits.device, torch.float32)
        return F.cross_entropy(logits.float(), mask, weight=w, ignore_index=ignore_index)
    return logits.float().sum() * 0.0


class SegmentationTask(TrainTask):
    """A segmenter (``build_segmenter``) trained with pixel cross-entropy (or ``loss``); validated by mIoU."""

    kind = KIND

    def __init__(self, model: nn.Module, *, head_lr_mult: float = 10.0, ignore_index: int = IGNORE_INDEX,
                 amp: bool = True, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 ) -> None:  # fmt: skip
        super().__init__()
        if not hasattr(unwrap(model), "config"):
            raise SegTrainError("the segmenter has no .config; build it with build_segmenter()")
        # NHWC weights, like the batches (uint8 HWC, permuted): every convolution runs NHWC without
        # converting its weights per call. On the 2-core CPU a DeepLab-v3+ step gains only 1.03x (the
        # input already set the layout); inference, where inputs were made contiguous, 1.5x
        # (bench/bench_segmenter_step.py). ``.to(device)`` keeps the layout.
        self.model = model.to(memory_format=torch.channels_last)
        self.head_lr_mult = head_lr_mult
        self.ignore_index = ignore_index
        self.amp = amp
        # The pixel loss (engine.training.losses.stage2_loss, e.g. PLF); default plain cross-entropy.
        self.loss_fn = loss

    @property
    def _cfg(self) -> dict[str, Any]:
        return unwrap(self.model).config

    def prepare(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        c = self._cfg
        x, m = batch_to_tensors(batch, device, mean=tuple(c["mean"]), std=tuple(c["std"]),
                                n_classes=c.get("n_classes"), ignore_index=self.ignore_index)  # fmt: skip
        return {"image": x, "mask": m}

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.model(batch["image"])
        if self.loss_fn is not None:
            return {"loss": self.loss_fn(logits, batch["mask"])}
        loss = segmentation_loss(logits, batch["mask"], self.ignore_index)
        return {"loss": loss}

    def param_groups(self) -> list[dict[str, Any]]:
        m = unwrap(self.model)
        if isinstance(m, DeepLab):
            return [
                {"params": m.backbone_parameters(), "name": "backbone"},
                {"params": m.head_parameters(), "name": "head", "lr_mult": self.head_lr_mult},
            ]
        return [{"params": [p for p in m.parameters() if p.requires_grad], "name": "all"}]

    def model_config(self) -> dict[str, Any]:
        return dict(self._cfg)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Mapping[str, Any]], device: torch.device) -> dict[str, Any]:
        out = evaluate(self.model, batches, amp=self.amp)
        out["score"] = out["miou"]
        return out


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Iterable[Mapping[str, Any] | tuple[Any, Any]],
    *,
    ignore_background: bool = False,
    amp: bool = True,
    boundary: bool = False,
) -> dict[str, Any]:
    """mIoU/Dice/FwIoU (``engine.metrics``) of the argmax prediction over (image, mask) batches.

    Truth pixels above N (255) are ignored; the scored classes are 1..N, background counting through
    false positives unless ``ignore_background``.
    """
    mcfg = getattr(unwrap(model), "config", {})
    if "n_classes" not in mcfg:
        raise SegTrainError("evaluate() needs a segmenter with config['n_classes'] (build_segmenter sets it)")
    meter = SegmentationMeter(
        int(mcfg["n_classes"]) - 1, ignore_background=ignore_background, boundary=boundary
    )
    device = next(iter(model.parameters())).device
    was = model.training
    model.eval()
    try:
        for batch in data:
            image, mask = batch_to_tensors(batch, device, mean=tuple(mcfg["mean"]), std=tuple(mcfg["std"]))
            with autocast(device, amp):
                pred = model(image).argmax(1)
            meter.update(pred.to(torch.uint8).cpu().numpy(), mask.cpu().numpy())
    finally:
        model.train(was)
    return meter.compute()


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> DeepLab:
    """Rebuild the checkpoint's segmenter from its stored config and load its weights (eval mode)."""
    state = read_checkpoint(path, KIND, error=SegTrainError)
    if not state.get("model_config"):
        raise SegTrainError(f"{path}: segmenter checkpoint without model_config")
    model = segmenter_from_config(state["model_config"])
    load_weights(Path(path), model, state["model"], error=SegTrainError)
    return model.to(device).eval()


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
