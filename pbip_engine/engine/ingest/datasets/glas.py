"""GlaS (gland segmentation) under the OEEM weak-supervision protocol, from ``root`` = the folder holding
``labels.csv``, ``images/<name>.jpg`` and ``masks/<name>.png`` (raw masks: 0 = non-gland, 1 = gland).

Classes (our convention, no background): 1 = ``gland``, 2 = ``non_gland``; raw masks are remapped with
``RAW_TO_OURS``. ``GlaSPatches`` crops training images into ``patch``-px patches every ``stride`` px (plus one
edge-aligned row/column so the whole image is covered) and labels each patch {gland present, non-gland
present} from the mask; the mask itself is returned only with ``with_mask=True`` (evaluation). mIoU over
both classes on ``testA`` (``GlaSImages``) is the published OEEM/Feng et al. metric.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.ingest.datasets.common import (
    DataError,
    labels_from_mask,
    read_index_mask,
    read_rgb,
    remap_mask,
)
from pbip_engine.engine.wsi.grid import grid_positions

CLASSES = ("gland", "non_gland")
RAW_TO_OURS = (2, 1)  # raw 0 = non-gland -> 2, raw 1 = gland -> 1
# OEEM's GlaS statistics (RGB), for callers that want them instead of ImageNet's.
MEAN_RGB = (0.787, 0.511, 0.785)
STD_RGB = (0.167, 0.248, 0.131)


def _read_index(root: Path, split: str) -> list[str]:
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"GlaS: {csv_path} not found (root must hold labels.csv, images/, masks/)")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"name", "split"} <= set(rows[0]):
        raise DataError(f"{csv_path}: needs columns 'name' and 'split', has {sorted(rows[0])}")
    names = [r["name"] for r in rows if r["split"] == split]
    if not names:
        splits = sorted({r["split"] for r in rows})
        raise DataError(f"{csv_path}: no images in split {split!r} (splits: {splits})")
    return names


class _GlaSBase:
    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.names = _read_index(self.root, split)
        self._images: dict[str, np.ndarray] = {}

    @property
    def class_names(self) -> list[str]:
        return list(CLASSES)

    def image(self, name: str) -> np.ndarray:
        if name not in self._images:
            path = self.root / "images" / f"{name}.jpg"
            if not path.is_file():
                alt = sorted((self.root / "images").glob(f"{name}.*"))
                if not alt:
                    raise DataError(f"GlaS: image for {name!r} not found in {self.root / 'images'}")
                path = alt[0]
            self._images[name] = read_rgb(path)
        return self._images[name]

    def mask(self, name: str) -> np.ndarray:
        path = self.root / "masks" / f"{name}.png"
        if not path.is_file():
            raise DataError(f"GlaS: mask {path} not found")
        return remap_mask(read_index_mask(path), RAW_TO_OURS, path)


class GlaSPatches(_GlaSBase):
    """Training patches with image-level labels; ``out_size`` resizes each patch (OEEM feeds 224 px)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        patch: int = 112,
        stride: int = 56,
        *,
        out_size: int | None = None,
        with_mask: bool = False,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        super().__init__(root, split)
        if patch < 1 or stride < 1:
            raise DataError(f"GlaS: patch and stride must be >= 1, got {patch}, {stride}")
        self.patch, self.stride, self.out_size = patch, stride, out_size
        self.with_mask, self.transform = with_mask, transform
        self.index: list[tuple[str, int, int]] = []
        labels = []
        self._masks: dict[str, np.ndarray] = {}
        for name in self.names:
            m = self.mask(name)
            self._masks[name] = m
            h, w = m.shape
            for y in grid_positions(h, patch, stride, edge="cover").tolist():
                for x in grid_positions(w, patch, stride, edge="cover").tolist():
                    self.index.append((name, y, x))
                    labels.append(labels_from_mask(m[y : y + patch, x : x + patch], len(CLASSES)))
        self.labels = np.asarray(labels, dtype=np.float32).reshape(-1, len(CLASSES))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, y, x = self.index[i]
        p = self.patch
        img = self.image(name)[y : y + p, x : x + p]
        if img.shape[:2] != (p, p):
            raise DataError(f"GlaS: image {name} is smaller than its mask ({img.shape[:2]} at {y},{x})")
        sample: dict[str, Any] = {
            "image": img,
            "labels": self.labels[i],
            "name": f"{name}_y{y}_x{x}",
            "source": name,  # where the patch was cut from, for the tiles dataset
            "x": x,
            "y": y,
            "size0": p,  # native px covered, whatever out_size resizes the patch to
        }
        if self.with_mask:
            sample["mask"] = self._masks[name][y : y + p, x : x + p]
        if self.out_size and self.out_size != p:
            s = self.out_size
            sample["image"] = cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR)
            if "mask" in sample:
                sample["mask"] = cv2.resize(sample["mask"], (s, s), interpolation=cv2.INTER_NEAREST)
        sample["image"] = np.ascontiguousarray(sample["image"])
        return self.transform(sample) if self.transform else sample


class GlaSImages(_GlaSBase):
    """Whole images + masks (our convention) + mask-derived labels, for evaluating pseudo/final masks."""

    def __init__(
        self, root: str | Path, split: str = "testA", transform: Callable[[dict], dict] | None = None
    ) -> None:
        super().__init__(root, split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        img, mask = self.image(name), self.mask(name)
        if mask.shape != img.shape[:2]:
            raise DataError(f"GlaS {name}: mask {mask.shape} vs image {img.shape[:2]}")
        sample = {"image": img, "mask": mask, "labels": labels_from_mask(mask, len(CLASSES)), "name": name}
        return self.transform(sample) if self.transform else sample
