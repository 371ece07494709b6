"""Segmentation methods as plugins: one folder per method, one import line each (below) to register it.

``get_method(name)`` returns the registered :class:`Method`; ``METHODS`` lists them. See ``base`` for what
a method provides, and ``ARCHITECTURE.md`` for where it plugs into the pipeline.
"""

# One line per method: importing the package registers it.
import pbip_engine.methods.gland
import pbip_engine.methods.lpd
import pbip_engine.methods.mpamatch
import pbip_engine.methods.pbip  # noqa: F401
from pbip_engine.methods.base import Method, MethodConfig, PseudoOptions, Stage1Inputs, Stage2Defaults
from pbip_engine.methods.registry import METHODS, get_method, register_method, unregister_method

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "PseudoOptions",
    "Stage1Inputs",
    "Stage2Defaults",
    "get_method",
    "register_method",
    "unregister_method",
]
