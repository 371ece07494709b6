"""LPD (Learnable Prototypes with Diversity regularisation, 2025): PBIP with learnable prototypes.

``config`` (spec keys), ``model`` (LpdNet, the loss step), ``losses`` (diversity regulariser, InfoNCE,
Omega_c), ``task`` (the stage-1 loop task), ``cams`` (pseudo masks), ``atlas`` (prototype atlas),
``method`` (the registry entry).
"""

from pbip_engine.methods.lpd.config import LpdConfig
from pbip_engine.methods.lpd.method import LpdMethod

__all__ = ["LpdConfig", "LpdMethod"]
