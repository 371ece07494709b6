"""Mixed precision in one place: bf16 autocast on CUDA where supported, fp16 + GradScaler elsewhere on CUDA.

CPU runs in fp32: autocast there slows the 2-core development machine down and changes no result worth
having, so ``amp=True`` is a no-op off CUDA.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 (or fp16) autocast on CUDA when enabled; a no-op elsewhere."""
    dev = torch.device(device)
    if not enabled or dev.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_grad_scaler(device: torch.device | str, amp: bool) -> torch.amp.GradScaler | None:
    """A GradScaler only where AMP runs in fp16 (CUDA without bf16); bf16 and fp32 need none."""
    dev = torch.device(device)
    if amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def backward_step(
    loss: torch.Tensor,
    parameters: nn.Module | list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """Backward + optional gradient clipping + optimiser step, through the AMP scaler when there is one."""
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
