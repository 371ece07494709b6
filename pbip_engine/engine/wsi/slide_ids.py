"""The one rule that turns a slide's file into its id: the name of every per-slide output and record.

Every stage and ``pbip-engine segment`` name their files ``<slide id>.<suffix>`` and key their records by
it, so two rules (``Path.stem`` in one place, ``x.ome.tif`` -> ``x`` in another) looked outputs up under
the wrong name, and two slides with one id silently overwrote each other. Hence one function, and one
check that refuses a cohort in which two files map to the same id (naming both files).

Ids never start with a dot: hidden names are skipped by readers that glob a folder, and could be taken
for temp files, so leading dots become underscores (``.tmp-scan.svs`` -> ``_tmp-scan``); the uniqueness
check then catches a clash with a real ``_tmp-scan.svs``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif")


class SlideIdError(ValueError):
    """Two inputs share one slide id; the message names both files."""


def slide_id(path: str | Path) -> str:
    """``a.svs`` -> ``a``, ``b.ome.tif`` -> ``b``, ``.tmp-scan.svs`` -> ``_tmp-scan``."""
    name = Path(path).name
    for suf in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suf) and len(name) > len(suf):
            name = name[: -len(suf)]
            break
    else:
        stem = Path(name).stem
        name = stem if stem and not (stem.startswith(".") and stem == name) else name
    stripped = name.lstrip(".")
    return "_" * (len(name) - len(stripped)) + stripped if stripped != name else name


def id_collisions(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Slide ids that more than one (distinct) input maps to, with those inputs."""
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        p = Path(p)
        group = by_id.setdefault(slide_id(p), [])
        if p not in group:
            group.append(p)
    return {k: v for k, v in by_id.items() if len(v) > 1}


def check_unique_ids(paths: Iterable[str | Path], key: str = "slides") -> None:
    """Raise :class:`SlideIdError` naming the files when two inputs would write the same outputs."""
    clashes = id_collisions(paths)
    if clashes:
        parts = [f"{', '.join(str(p) for p in v)} -> {k!r}" for k, v in sorted(clashes.items())]
        raise SlideIdError(
            f"{key}: several slides share one slide id (the file name without its extension names every "
            f"output, so one would overwrite the other): {'; '.join(parts)}; rename or move one of them"
        )
