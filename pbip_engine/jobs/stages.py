"""The built-in stages: importing this module registers them, in the order ``all_stages`` breaks ties.

Kept apart from ``jobs.stage`` (the base classes) so that the base imports no stage and each stage
imports only the base; the driver and anything else that needs the whole pipeline import this module.
"""

from __future__ import annotations

import pbip_engine.jobs.bank
import pbip_engine.jobs.embed
import pbip_engine.jobs.infer
import pbip_engine.jobs.pseudo
import pbip_engine.jobs.synth
import pbip_engine.jobs.tile
import pbip_engine.jobs.train_stage1
import pbip_engine.jobs.train_stage2  # noqa: F401
from pbip_engine.jobs.stage import all_stages, get_stage

__all__ = ["all_stages", "get_stage"]
