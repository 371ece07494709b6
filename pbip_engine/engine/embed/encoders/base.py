"""Shared pieces of every tile encoder: metadata, the ``Encoder`` module, and checked weight loading.

Weights only ever come from local files the user names. Loading is strict about *shapes* (a checkpoint of
another architecture must fail loudly, naming the first tensor that disagrees) but only warns about
missing/unexpected keys, because checkpoints routinely carry heads or text towers we do not use.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class EncoderError(ValueError):
    """Bad encoder name, missing/incompatible checkpoint, or bad input to an encoder."""


@dataclass(frozen=True)
class EncoderInfo:
    """What a caller needs to feed an encoder and to store its output."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int


class Encoder(torch.nn.Module):
    """A tile encoder: ``forward`` maps a normalised ``B,3,H,W`` float batch to ``B,dim`` embeddings.

    Subclasses only provide ``forward``; preprocessing lives here so every family resizes and
    normalises identically (and cheaply: one fused multiply-add per pixel, on the target device).

    ``channel_order="bgr"`` and ``minmax=True`` exist only to reproduce the public PBIP code, which fed
    cv2 BGR images and then min-max scaled each whole tensor to [0, 1].
    """

    info: EncoderInfo

    def __init__(
        self, info: EncoderInfo, *, channel_order: str = "rgb", minmax: bool = False, resize: str = "bilinear"
    ) -> None:
        super().__init__()
        if channel_order not in ("rgb", "bgr"):
            raise EncoderError(f"{info.name}: channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.info = info
        self.channel_order = channel_order
        self.minmax = minmax
        self.resize_mode = resize
        mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_norm = (u8/255 - mean)/std = u8 * scale + shift
        self.register_buffer("_pp_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("_pp_shift", -mean / std, persistent=False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return self._pp_scale.device

    def preprocess(
        self, rgb_uint8_batch: np.ndarray | torch.Tensor, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``B,H,W,3`` uint8 RGB -> resized, normalised ``B,3,S,S`` float32 tensor on ``device``.

        The uint8 batch is moved before conversion so only 1 byte/px crosses to an accelerator.
        """
        x = torch.as_tensor(rgb_uint8_batch)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise EncoderError(
                f"{self.info.name}.preprocess expects a B,H,W,3 uint8 RGB batch, got shape "
                f"{tuple(x.shape)} dtype {x.dtype}"
            )
        dev = torch.device(device) if device is not None else self._pp_scale.device
        x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)
        if self.channel_order == "bgr":
            x = x.flip(1)
        x = x.float()
        s = self.info.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode=self.resize_mode, align_corners=False, antialias=True)
            x = x.clamp_(0, 255)
        x = x * self._pp_scale.to(dev) + self._pp_shift.to(dev)
        if self.minmax:
            flat = x.flatten(1)
            lo = flat.min(1).values.view(-1, 1, 1, 1)
            hi = flat.max(1).values.view(-1, 1, 1, 1)
            x = (x - lo) / (hi - lo).clamp_min(1e-6)
        return x.contiguous()

    def embed(self, rgb_uint8_batch: np.ndarray) -> torch.Tensor:
        """Convenience: preprocess + forward under inference mode (float32, no autocast)."""
        with torch.inference_mode():
            return self(self.preprocess(rgb_uint8_batch))


class ModuleEncoder(Encoder):
    """Wraps a backbone returning pooled features, optionally followed by a projection."""

    def __init__(
        self,
        info: EncoderInfo,
        backbone: torch.nn.Module,
        projection: torch.nn.Module | None = None,
        **pp_kw: object,
    ) -> None:
        super().__init__(info, **pp_kw)
        self.backbone = backbone
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)
        if isinstance(z, (tuple, list)):
            z = z[0]
        if self.projection is not None:
            z = self.projection(z)
        return z


# --------------------------------------------------------------------------------------------- checkpoints


def file_sha256(path: str | Path, _cache: dict = {}) -> str:  # noqa: B006 - deliberate memo
    """sha256 of a file, memoised on (path, size, mtime) so multi-GB checkpoints are hashed once."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no pickled code).

    Unwraps the usual containers (``state_dict``, ``model``, ``module``) so callers see bare tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise EncoderError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(f"could not read checkpoint {p}: {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise EncoderError(f"checkpoint {p} does not hold a state dict (got {type(sd).__name__})")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EncoderError(f"checkpoint {p} holds no tensors")
    return tensors


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. ``module.`` from DDP checkpoints)."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_state_dict_checked(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    strict_shapes: bool = True,
) -> None:
    """Load ``state_dict`` into ``module``; refuse shape mismatches, warn about key mismatches.

    The error names the first mismatched tensor (module order), both shapes and ``source`` (the file),
    which is what a user needs when they point an encoder at the wrong architecture's checkpoint.
    """
    own = module.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(state_dict[k].shape))
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if mismatched and strict_shapes:
        k, want, got = mismatched[0]
        raise EncoderError(
            f"checkpoint {source} does not fit {type(module).__name__}: first mismatched tensor {k!r} "
            f"expects shape {want}, checkpoint has {got} ({len(mismatched)} mismatched in all); "
            "is it a checkpoint of another architecture?"
        )
    bad = {k for k, _, _ in mismatched}
    usable = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if not usable:
        raise EncoderError(
            f"checkpoint {source} shares no tensor names with {type(module).__name__} "
            f"(checkpoint keys start {list(state_dict)[:3]}, model keys start {list(own)[:3]})"
        )
    result = module.load_state_dict(usable, strict=False)
    missing = sorted(set(missing) | set(result.missing_keys), key=list(own).index)
    if missing:
        log.warning(
            "%s: %d model tensors missing from the checkpoint (left at init), e.g. %s",
            source,
            len(missing),
            missing[:5],
        )
    if unexpected:
        log.warning(
            "%s: %d unexpected checkpoint tensors ignored, e.g. %s", source, len(unexpected), unexpected[:5]
        )
    if bad:
        log.warning("%s: %d shape-mismatched tensors skipped, e.g. %s", source, len(bad), sorted(bad)[:5])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def checkpoint_path(checkpoint: str | Path | None) -> Path | None:
    """Expand ``~``/env vars so ids and error messages show the real file."""
    if checkpoint is None:
        return None
    return Path(os.path.expandvars(os.path.expanduser(str(checkpoint))))
