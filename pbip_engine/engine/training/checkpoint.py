"""The one checkpoint format of every trained model (stage 1 and stage 2 of every method).

A checkpoint is a ``weights_only``-loadable dict: ``format``, ``kind`` (what the weights are, e.g.
``"stage1:pbip"`` or ``"segmenter"``), ``model`` (state dict), ``model_config`` (enough to rebuild the
model without the spec), ``optimizer``/``scaler`` (resume state, absent in exported weights), ``epoch``,
``step``, ``metrics``, ``config`` (the training settings). When the loop keeps a moving average of the
weights, ``model`` is the average (what every reader loads) and ``training_model`` the weights the
optimiser moves (what a resumed run goes on from), after ``average_steps`` updates. Writes are atomic,
so a crash mid-save never leaves a truncated file under the final name; every failure to read names the
file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pbip_engine.engine.io.atomic import atomic_save, jsonable
from pbip_engine.engine.training.inputs import unwrap

FORMAT = "pbip-engine/checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    kind: str,
    epoch: int = 0,
    step: int = 0,
    metrics: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    model_config: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    training_model: nn.Module | None = None,
    average_steps: int | None = None,
) -> Path:
    """Atomically write weights, their rebuild config and (optionally) the optimiser/scaler resume state."""
    state = {
        "format": FORMAT,
        "kind": kind,
        "model": unwrap(model).state_dict(),
        "model_config": jsonable(dict(model_config)) if model_config is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "metrics": jsonable(dict(metrics or {})),
        "config": jsonable(dict(config)) if config is not None else None,
    }
    if training_model is not None:
        state["training_model"] = unwrap(training_model).state_dict()
        state["average_steps"] = int(average_steps or 0)
    p = Path(path)
    atomic_save(p, lambda tmp: torch.save(state, tmp))
    return p


def read_checkpoint(
    path: str | Path,
    kind: str | None = None,
    *,
    map_location: str | torch.device = "cpu",
    error: type[Exception] = CheckpointError,
) -> dict[str, Any]:
    """The checkpoint dict (``weights_only`` load); a missing, unreadable or foreign file raises ``error``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise error(f"could not read checkpoint {p}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise error(f"{p} is not a pbip-engine checkpoint (format {FORMAT})")
    if kind is not None and state.get("kind") != kind:
        raise error(f"{p} holds {state.get('kind')!r} weights, expected {kind!r}")
    return state


def submodule_weights(
    path: str | Path, prefix: str, *, error: type[Exception] = CheckpointError
) -> dict[str, Any]:
    """The tensors of a checkpoint's model under ``prefix``, with the prefix removed: how stage 2 starts
    from a stage-1 model's backbone (``backbone.``). A checkpoint with nothing under it raises, naming it."""
    sd = read_checkpoint(path, error=error)["model"]
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise error(f"{path}: the model has no weights under {prefix!r}")
    return out


def load_weights(
    p: Path,
    model: nn.Module,
    sd: Mapping[str, Any],
    *,
    error: type[Exception] = CheckpointError,
    hint: str = "",
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


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The ``epoch_NNNN.pt`` with the highest epoch in ``ckpt_dir`` (None if there is none)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    found = [
        (int(m.group(1)), f) for f in d.glob("epoch_*.pt") if (m := re.fullmatch(r"epoch_(\d+)\.pt", f.name))
    ]
    return max(found)[1] if found else None
