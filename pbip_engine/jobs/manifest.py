"""Stage manifests: what a stage was run on (input hash), what it produced, and how it went.

A stage whose manifest says ``done`` with the same input hash is skipped on a re-run (TRIDENT-style
"skip what is done"); the hash chains through upstream manifests so a change upstream re-runs
everything below it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pbip_engine.engine.io.atomic import atomic_write_text

MANIFEST = "manifest.json"
_VERSIONED = (
    "pbip-engine",
    "torch",
    "timm",
    "ray",
    "pyarrow",
    "numpy",
    "tifffile",
    "tiffslide",
    "cucim-cu13",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def input_hash(stage: str, stage_version: int, spec_json: str, upstream: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([stage, stage_version, spec_json, sorted(upstream.items())]).encode())
    return h.hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def new_manifest(stage: str, in_hash: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage,
        "input_hash": in_hash,
        "inputs": inputs,
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "running",
    }
