"""Pieces shared by bench/gpu_glas.py and bench/gpu_throughput.py (one GPU call, Ray-free)."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from typing import Any

import torch


class NullStore:
    """A checkpoint store that keeps nothing: a benchmark trains once and never resumes."""

    def latest(self) -> None:
        return None

    def save(self, write: Callable, record: dict, history: list, is_best: bool) -> None:
        return None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def apply_tiny(ap: argparse.ArgumentParser, args: argparse.Namespace, tiny: dict[str, Any]) -> None:
    """``--tiny``: these settings replace every default the command line did not override."""
    for k, v in tiny.items():
        if getattr(args, k) == ap.get_default(k):
            setattr(args, k, v)


def setup_device(name: str) -> torch.device:
    """``auto`` -> cuda when present; on CUDA: cuDNN autotuning and TF32 for what bf16 autocast leaves in fp32."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def device_record(dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """What every result JSON starts with: device, its name, torch version, the settings."""
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    )
    settings = {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                for k, v in vars(args).items()}  # fmt: skip
    return {"device": str(dev), "device_name": name, "torch": torch.__version__, "settings": settings}


def finish(res: dict[str, Any], out: Any, dev: torch.device) -> dict[str, Any]:
    """Add the peak GPU memory and write ``res`` as JSON to ``out`` (a path, or None for no file)."""
    import json
    from pathlib import Path

    if dev.type == "cuda":
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1, default=float))
    return res
