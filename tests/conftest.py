"""Shared fixtures: the read-only real data beside the repo, skipped cleanly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    d = shared_data / "wsi"
    if not d.is_dir():
        pytest.skip(f"no real slides at {d}")
    return d


@pytest.fixture(scope="session")
def glas_dir(shared_data: Path) -> Path:
    d = shared_data / "glas"
    if not d.is_dir():
        pytest.skip(f"no GlaS data at {d}")
    return d
