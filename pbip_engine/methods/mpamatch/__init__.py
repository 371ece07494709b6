"""MPAMatch (arXiv 2508.19574): semi-supervised segmentation with image and text prototypes; see ``method``."""

from pbip_engine.methods.mpamatch.method import MpaMatchMethod

__all__ = ["MpaMatchMethod"]
