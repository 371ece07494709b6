"""The cohort's class areas as CSV: what a pathologist or a statistics script reads first."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pbip_engine.engine.io.atomic import atomic_write_text


def write_areas_csv(path: Path, rows: dict[str, dict[str, Any]], class_names: list[str]) -> None:
    """One row per slide (sorted by id): tissue area and each class's area, for spreadsheets and stats."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["slide", "tissue_mpix", *[f"{c}_um2" for c in class_names]])
    for sid, st in sorted(rows.items()):
        areas = st.get("class_areas_um2", {})
        w.writerow(
            [
                sid,
                round(st.get("tissue_mpix", 0.0), 3),
                *[round(areas.get(c, 0.0), 1) for c in class_names],
            ]
        )
    atomic_write_text(path, buf.getvalue())
