"""A generic labelled folder: ``root/<image>`` files listed in a CSV with columns ``image,labels``.

``labels`` holds ``;``-separated class names (empty = no class). An optional ``mask`` column names a mask
PNG already in our convention (0 = background, k = class k), for evaluation splits.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.engine.ingest.datasets.common import DataError, read_index_mask, read_rgb


class FolderCSVDataset:
    """Samples from a folder + CSV; ``class_names`` default to the sorted names found in the CSV."""

    def __init__(
        self,
        root: str | Path,
        csv_path: str | Path,
        class_names: Sequence[str] | None = None,
        *,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.root = Path(root)
        csv_file = Path(csv_path)
        if not csv_file.is_absolute() and not csv_file.is_file():
            csv_file = self.root / csv_file
        if not csv_file.is_file():
            raise DataError(f"CSV not found: {csv_path}")
        with open(csv_file, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise DataError(f"{csv_file}: no rows")
        if not {"image", "labels"} <= set(rows[0]):
            raise DataError(f"{csv_file}: needs columns 'image' and 'labels', has {sorted(rows[0])}")
        parsed = [[s.strip() for s in (r["labels"] or "").split(";") if s.strip()] for r in rows]
        if class_names is None:
            class_names = sorted({c for names in parsed for c in names})
        self.class_names = list(class_names)
        pos = {c: i for i, c in enumerate(self.class_names)}
        self.images: list[Path] = []
        self.masks: list[Path | None] = []
        labels = []
        for line, (row, names) in enumerate(zip(rows, parsed, strict=True), start=2):
            unknown = [c for c in names if c not in pos]
            if unknown:
                raise DataError(f"{csv_file}:{line}: unknown class {unknown} (known: {self.class_names})")
            y = np.zeros(len(self.class_names), dtype=np.float32)
            y[[pos[c] for c in names]] = 1.0
            labels.append(y)
            self.images.append(self.root / row["image"])
            self.masks.append(self.root / row["mask"] if row.get("mask") else None)
        self.labels = np.stack(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "image": read_rgb(self.images[i]),
            "labels": self.labels[i],
            "name": self.images[i].stem,
        }
        if self.masks[i] is not None:
            mask = read_index_mask(self.masks[i])
            if mask.size and mask.max() > len(self.class_names):
                raise DataError(
                    f"{self.masks[i]}: value {mask.max()} > number of classes {len(self.class_names)}"
                )
            sample["mask"] = mask
        return self.transform(sample) if self.transform else sample
