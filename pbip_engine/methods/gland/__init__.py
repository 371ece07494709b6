"""The gland method (Feng et al., AAAI 2025): CCA and MPFP in the CAM classifier; PLF in stage 2
on request (``segmenter.loss: plf``)."""

from pbip_engine.methods.gland.method import GlandMethod

__all__ = ["GlandMethod"]
