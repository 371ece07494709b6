"""BCSS-WSSS and LUAD-HistoSeg (Han et al., MLPS) folder datasets, remapped to the project's mask convention.

Layouts accepted (those of the PBIP and TPRO loaders): ``train/*.png`` (PBIP) or ``train/img/*.png`` (TPRO), and
``{valid|val|test}/{img,mask}/*.png`` with image and mask sharing a basename. ``root`` may be the dataset
folder itself or its parent. Training labels come from the file name (both formats,
``parse_filename_labels``); val/test labels are derived from the mask (the "oracle" image labels PBIP/TPRO evaluate with). Raw masks are palettised
with index 4 = background; we map raw k -> k+1 and 4 -> 0, so 0 = background and class k = ``CLASSES[k-1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbip_engine.engine.ingest.datasets.common import (
    DataError,
    labels_from_mask,
    list_images,
    parse_filename_labels,
    read_index_mask,
    read_rgb,
    remap_mask,
)
from pbip_engine.engine.nn.normalize import IMAGENET_MEAN, IMAGENET_STD

RAW_TO_OURS = (1, 2, 3, 4, 0)  # raw index 4 = BACK


def _bgr_to_rgb(stats: tuple[float, float, float]) -> tuple[float, float, float]:
    return (stats[2], stats[1], stats[0])


class _WSSSFolderDataset:
    CLASSES: tuple[str, ...] = ()
    DIR_NAME = ""
    # TPRO/PBIP statistics were computed on cv2 BGR images (zhangst431/TPRO, QingchenTang/PBIP); exposed here in RGB order.
    MEAN_RGB: tuple[float, float, float] = IMAGENET_MEAN
    STD_RGB: tuple[float, float, float] = IMAGENET_STD

    def __init__(
        self, root: str | Path, split: str = "train", transform: Callable[[dict], dict] | None = None
    ) -> None:
        r = Path(root)
        if not (r / "train").is_dir() and (r / self.DIR_NAME).is_dir():
            r = r / self.DIR_NAME
        if not r.is_dir():
            raise DataError(f"{type(self).__name__}: dataset root not found: {root}")
        self.root, self.transform = r, transform
        self.split = self._resolve_split(r, split)
        folder = r / self.split
        self.masks: list[Path] | None = None
        if self.split == "train":
            img_dir = folder / "img" if (folder / "img").is_dir() else folder
            self.images = list_images(img_dir)
            self.labels = [parse_filename_labels(p.name, len(self.CLASSES)) for p in self.images]
        else:
            img_dir, mask_dir = folder / "img", folder / "mask"
            for d in (img_dir, mask_dir):
                if not d.is_dir():
                    raise DataError(f"{type(self).__name__}: {d} missing ({self.split} needs img/ and mask/)")
            self.images = list_images(img_dir)
            masks = {p.stem: p for p in list_images(mask_dir)}
            missing = [p.name for p in self.images if p.stem not in masks]
            if missing:
                raise DataError(f"{mask_dir}: no mask for {len(missing)} images, e.g. {missing[:5]}")
            self.masks = [masks[p.stem] for p in self.images]
            self.labels = []
        if not self.images:
            raise DataError(f"{type(self).__name__}: no images under {folder}")

    @staticmethod
    def _resolve_split(root: Path, split: str) -> str:
        aliases = {"val": ("valid", "val"), "valid": ("valid", "val")}.get(split, (split,))
        for name in aliases:
            if (root / name).is_dir():
                return name
        raise DataError(f"split {split!r} not found under {root} (looked for {list(aliases)})")

    @property
    def class_names(self) -> list[str]:
        return list(self.CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.images[i]
        sample: dict[str, Any] = {"image": read_rgb(path), "name": path.stem}
        if self.masks is None:
            sample["labels"] = self.labels[i]
        else:
            mask = remap_mask(read_index_mask(self.masks[i]), RAW_TO_OURS, self.masks[i])
            if mask.shape != sample["image"].shape[:2]:
                raise DataError(f"{self.masks[i]}: mask {mask.shape} vs image {sample['image'].shape[:2]}")
            sample["mask"] = mask
            sample["labels"] = labels_from_mask(mask, len(self.CLASSES))
        return self.transform(sample) if self.transform else sample


class BCSSWSSSDataset(_WSSSFolderDataset):
    """BCSS-WSSS: classes TUM, STR, LYM, NEC (file-name label order)."""

    CLASSES = ("TUM", "STR", "LYM", "NEC")
    DIR_NAME = "BCSS-WSSS"
    MEAN_RGB = _bgr_to_rgb((0.66791496, 0.47791372, 0.70623304))
    STD_RGB = _bgr_to_rgb((0.1736589, 0.22564577, 0.19820057))


class LUADHistoSegDataset(_WSSSFolderDataset):
    """LUAD-HistoSeg: classes TE, NEC, LYM, TAS (file-name label order)."""

    CLASSES = ("TE", "NEC", "LYM", "TAS")
    DIR_NAME = "LUAD-HistoSeg"
    MEAN_RGB = _bgr_to_rgb((0.69164956, 0.50502165, 0.73429191))
    STD_RGB = _bgr_to_rgb((0.15521939, 0.22774934, 0.18846453))


__all__ = ["RAW_TO_OURS", "BCSSWSSSDataset", "LUADHistoSegDataset"]
