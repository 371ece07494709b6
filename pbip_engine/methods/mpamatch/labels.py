"""Which images are labelled, where their exact masks are, and each tile's mask crop.

An image (a slide, or a patch set's source image such as a GlaS train image) is labelled when it has a
mask and is in ``method.labelled`` (or drawn by ``labelled_fraction`` with ``run.seed``); every other image
of the cohort is unlabelled. The split is a function of the spec alone (never of which tiles a run
produced), so ``pbip-engine validate`` checks the same split the run trains on, and a re-run draws it
again. Masks are read lazily at level 0 and cropped per tile (a whole slide's mask is never held), from
PNG/TIFF class-index masks or QuPath GeoJSON outlines rasterised per tile window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pbip_engine.engine.metrics import IGNORE_INDEX

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".geojson", ".json")
DRAWS = 32  # seeded draws compared for class coverage (cover_classes)


class LabelError(ValueError):
    """A labelled split or mask that cannot be used; the message names the key, image or file."""


def image_ids(spec: Any) -> list[str]:
    """The cohort's image ids as the tile stage names them (``slide_id``), from the spec alone."""
    d = spec.data
    if d.synthetic is not None:
        return [f"synth_{i:03d}" for i in range(d.synthetic.slides)]
    if d.patches is not None:
        if d.patch_format != "glas":
            raise LabelError(f"data.patch_format {d.patch_format!r} has no source images to label (use glas)")
        from pbip_engine.engine.ingest.datasets.glas import GlaSImages

        return list(GlaSImages(d.patches, "train").names)  # reads the index only
    from pbip_engine.schemas.spec import expand_slides

    return [p.stem for p in expand_slides(d.slides)]


def find_masks(folder: str | Path, ids: Sequence[str]) -> dict[str, Path]:
    """Image id -> its mask file in ``folder`` (``<id>.png|.tif|.tiff|.geojson`` or ``<id>.mask.tif``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LabelError(f"method.masks: {str(folder)!r} is not a folder")
    out: dict[str, Path] = {}
    for i in ids:
        for name in [f"{i}{s}" for s in MASK_SUFFIXES] + [f"{i}.mask.tif"]:
            if (folder / name).is_file():
                out[i] = folder / name
                break
    return out


def choose_labelled(
    ids: Sequence[str],
    masks: dict[str, Path],
    cfg: Any,
    seed: int,
    classes_of: Callable[[str], set[int]] | None = None,
) -> list[str]:
    """The labelled ids: ``cfg.labelled`` checked, else ``round(fraction * len(with masks))`` (>= 1) drawn with ``seed``.

    With ``classes_of`` (image id -> classes in its mask) and ``cfg.cover_classes``, ``DRAWS`` seeded draws are
    made and the first that covers the most classes is kept: a class no labelled image shows cannot be learnt
    (on the demo cohort no slide has all four classes, and a plain draw of 1 of 4 can show only two).
    """
    if cfg.labelled:
        missing = [n for n in cfg.labelled if n not in ids]
        if missing:
            raise LabelError(
                f"method.labelled: {missing[:5]} are not images of the cohort (e.g. {list(ids)[:3]})"
            )
        no_mask = [n for n in cfg.labelled if n not in masks]
        if no_mask:
            raise LabelError(f"method.labelled: no mask for {no_mask[:5]} in method.masks")
        chosen = sorted(set(cfg.labelled))
    else:
        pool = sorted(masks)
        if not pool:
            raise LabelError(
                "method.masks: no mask is named like an image of the cohort (<image id>.png|.tif|...)"
            )
        k = min(len(pool), max(1, round(cfg.labelled_fraction * len(pool))))
        rng = np.random.default_rng(seed)
        best: tuple[int, list[str]] | None = None
        for _ in range(DRAWS if classes_of is not None and getattr(cfg, "cover_classes", False) else 1):
            draw = sorted(rng.choice(pool, size=k, replace=False).tolist())
            score = len(set().union(*(classes_of(i) for i in draw)) - {0, IGNORE_INDEX}) if classes_of else 0
            if best is None or score > best[0]:
                best = (score, draw)
        chosen = best[1]
    if cfg.semi and len(chosen) >= len(ids):
        raise LabelError(
            f"method.labelled: all {len(ids)} images are labelled, no unlabelled data left for the semi-supervised "
            "parts (lower labelled_fraction, or set consistency/image_prototypes/text_prototypes to false)"
        )
    return chosen


# -- reading masks ---------------------------------------------------------------------------------------


def _lut(raw: np.ndarray, lut: Sequence[int] | None, path: Path) -> np.ndarray:
    if not lut:
        return raw
    table = np.full(256, IGNORE_INDEX, np.uint8)
    table[: len(lut)] = lut
    bad = sorted({int(v) for v in np.unique(raw) if v >= len(lut) and v != IGNORE_INDEX})
    if bad:
        raise LabelError(f"{path}: mask values {bad[:8]} are outside method.mask_lut ({len(lut)} entries)")
    return table[raw]


class MaskSource:
    """One image's mask at level 0, cropped per tile (``region``); PNG in memory, TIFF lazily, GeoJSON per window."""

    def __init__(self, path: Path, class_names: Sequence[str], lut: Sequence[int] | None = None) -> None:
        self.path, self.lut = Path(path), lut
        self.n_classes = len(class_names)
        suffix = self.path.suffix.lower()
        if suffix in (".geojson", ".json"):
            from pbip_engine.engine.annotations.geojson import read_annotations

            index = {n: i + 1 for i, n in enumerate(class_names)}
            self.shapes = []
            for a in read_annotations(self.path):
                if a.name not in index:
                    raise LabelError(
                        f"{self.path}: class {a.name!r} is not one of the spec's classes {list(index)}"
                    )
                self.shapes.append((index[a.name], a.geometry))
            self.array = None
        elif suffix == ".png":
            from pbip_engine.engine.ingest.datasets.common import DataError, read_index_mask

            try:
                self.array = _lut(read_index_mask(self.path), lut, self.path)
            except DataError as e:
                raise LabelError(str(e)) from e
        else:
            from pbip_engine.engine.pseudo.scoring import open_truth

            try:
                self.array = open_truth(self.path)
            except Exception as e:
                raise LabelError(f"{self.path}: not a readable TIFF mask: {type(e).__name__}: {e}") from e

    @property
    def shape(self) -> tuple[int, int] | None:
        """(height, width) at level 0, or None for outlines (they have no extent of their own)."""
        return None if self.array is None else tuple(int(s) for s in self.array.shape[:2])  # type: ignore[return-value]

    def check(self, image_hw: tuple[int, int] | None) -> None:
        """Size against the image (level 0) and values against the classes; one line naming the file."""
        if self.array is None:
            return
        if self.array.ndim != 2:
            raise LabelError(
                f"{self.path}: mask must be one channel of class indices, got shape {self.array.shape}"
            )
        if image_hw is not None and self.shape != tuple(image_hw):
            raise LabelError(f"{self.path}: mask is {self.shape} (h, w) but its image is {tuple(image_hw)}")
        step = max(1, max(self.shape) // 2048)  # a large pyramid is checked on a strided view
        vals = np.unique(np.asarray(self.array[::step, ::step]))
        bad = [int(v) for v in vals if v > self.n_classes and v != IGNORE_INDEX]
        if bad:
            raise LabelError(
                f"{self.path}: mask values {bad[:8]} are not classes 0..{self.n_classes} (0 = background) or "
                f"{IGNORE_INDEX} (ignore); raw masks with other codes need method.mask_lut"
            )

    def classes(self) -> set[int]:
        """Classes present (a large pyramid is read on a strided view; outlines: their classes)."""
        if self.array is None:
            return {c for c, _ in self.shapes}
        step = max(1, max(self.shape) // 2048)  # type: ignore[type-var]
        vals = np.unique(np.asarray(self.array[::step, ::step]))
        if self.lut and self.path.suffix.lower() != ".png":
            vals = np.unique(_lut(vals.astype(np.uint8), self.lut, self.path))
        return {int(v) for v in vals}

    def region(self, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
        """The level-0 square ``size0`` at (x, y) as an ``out_px`` uint8 mask; outside the image is ignore (255)."""
        import cv2

        if self.array is None:
            return self._rasterise(x, y, size0, out_px)
        crop = np.full((size0, size0), IGNORE_INDEX, np.uint8)
        h, w = self.shape  # type: ignore[misc]
        x1, y1 = min(w, x + size0), min(h, y + size0)
        if x1 > x and y1 > y:
            crop[: y1 - y, : x1 - x] = np.asarray(self.array[y:y1, x:x1])
        if self.lut and self.path.suffix.lower() != ".png":
            crop = _lut(crop, self.lut, self.path)
        return (
            cv2.resize(crop, (out_px, out_px), interpolation=cv2.INTER_NEAREST) if size0 != out_px else crop
        )

    def _rasterise(self, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
        import cv2
        from shapely.geometry import box

        out = np.zeros((out_px, out_px), np.uint8)
        window = box(x, y, x + size0, y + size0)
        scale = out_px / size0
        for cls, geom in self.shapes:
            if not geom.intersects(window):
                continue
            part = geom.intersection(window)
            for poly in getattr(part, "geoms", [part]):
                if poly.geom_type != "Polygon" or poly.is_empty:
                    continue

                def pts(ring: Any) -> np.ndarray:
                    a = (np.asarray(ring.coords) - (x, y)) * scale
                    return np.round(a).astype(np.int32)

                cv2.fillPoly(out, [pts(poly.exterior)], int(cls))
                if poly.interiors:
                    cv2.fillPoly(out, [pts(r) for r in poly.interiors], 0)
        return out


def mask_reader(
    paths: dict[str, str], class_names: Sequence[str], lut: Sequence[int] | None
) -> Callable[[str], MaskSource]:
    """Image id -> its (cached) :class:`MaskSource`; what a Ray Data task builds once per process."""

    @lru_cache(maxsize=4)
    def get(image_id: str) -> MaskSource:
        return MaskSource(Path(paths[image_id]), class_names, lut)

    return get


class AttachMasks:
    """Tile rows -> + ``mask`` (PNG bytes; all-ignore for unlabelled images) + ``labelled``: the segmenter
    stage maps this over the tiles (picklable; masks opened once per process)."""

    def __init__(self, paths: dict[str, str], class_names: Sequence[str], lut: Sequence[int] | None) -> None:
        self.paths, self.class_names, self.lut = dict(paths), list(class_names), lut
        self._get: Callable[[str], MaskSource] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_get": None}

    def mask(self, slide_id: str, x: int, y: int, size0: int, tile_px: int) -> np.ndarray | None:
        if slide_id not in self.paths:
            return None
        if self._get is None:
            self._get = mask_reader(self.paths, self.class_names, self.lut)
        return self._get(slide_id).region(x, y, size0, tile_px)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import cv2

        masks, flags = [], []
        for sid, x, y, s0, px in zip(
            batch["slide_id"], batch["x"], batch["y"], batch["size0"], batch["tile_px"], strict=True
        ):
            m = self.mask(str(sid), int(x), int(y), int(s0), int(px))
            flags.append(m is not None)
            m = np.full((int(px), int(px)), IGNORE_INDEX, np.uint8) if m is None else m
            masks.append(cv2.imencode(".png", m)[1].tobytes())
        out = dict(batch)
        out["mask"] = np.array(masks, dtype=object)
        out["labelled"] = np.array(flags, dtype=bool)
        return out
