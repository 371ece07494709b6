"""PBIP (Prototype-Based Image Prompting, CVPR 2025): ClassNet CAMs on bank prototypes + FG/BG matching.

``classnet`` (ClassNet, ImgMatchNet, the VARIANTS table), ``losses`` (Eq. 3-13), ``task`` (the stage-1
loop task), ``cams`` (pseudo masks), ``config`` (spec keys), ``method`` (the registry entry).
"""

from pbip_engine.methods.pbip.config import PbipConfig
from pbip_engine.methods.pbip.method import PbipMethod

__all__ = ["PbipConfig", "PbipMethod"]
