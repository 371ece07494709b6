"""pbip-engine: whole-slide weakly supervised segmentation with prototype-based image prompting."""

from __future__ import annotations

import contextlib
import sys

__version__ = "0.1.0"


def _preload_cucim() -> bool:
    """Load cuCIM before torch.

    cuCIM's GPUDirect-Storage initialiser (a static constructor in libcucim) spins forever inside
    ``cuFileDriverOpen`` when torch's CUDA build has already put ``libcufile.so.0`` in the process.
    Loaded first, it finds no libcufile and skips GDS. If torch is already loaded we do not risk the
    hang: cuCIM is then reported unavailable and the reader chain falls back to tiffslide.
    """
    if "cucim.clara" in sys.modules:
        return True
    if "torch" in sys.modules:
        return False
    try:
        from cucim.clara import CuImage
    except Exception:
        return False
    # The GDS driver initialises on the first open, not at import: do it now, while torch is absent.
    with contextlib.suppress(Exception):
        CuImage("/nonexistent/pbip-engine-cucim-warmup.tif")
    return True


CUCIM_AVAILABLE: bool = _preload_cucim()
