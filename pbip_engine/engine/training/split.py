"""A deterministic train/validation split by key, the same on every worker, re-run and machine.

Hashing the tile id (rather than shuffling a list) needs no coordination between Ray Data read tasks,
never materialises the dataset, and keeps a tile on the same side when the cohort grows.
"""

from __future__ import annotations

import zlib


def is_validation(key: str, fraction: float) -> bool:
    """Whether ``key`` falls in the held-out ``fraction`` (CRC-32 of the key, uniform in [0, 1))."""
    if fraction <= 0:
        return False
    return zlib.crc32(str(key).encode()) / 2**32 < fraction
