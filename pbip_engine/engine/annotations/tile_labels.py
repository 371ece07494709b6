"""Image-level (multi-hot) tile labels from QuPath outlines or from per-slide labels.

Weak supervision needs only "which classes are in this tile". Outlines drawn in QuPath give that per
tile: class c is present when its polygons cover at least ``min_fraction`` of the tile square. A tile
that touches no outline, or whose coverage stays below ``min_fraction`` for every class, is
*unlabelled* (``labelled=False``, all zeros): absence of an outline is not evidence of absence of a
class, so such tiles are kept for embedding/inference but not used as labelled training data.

Class names are matched case-insensitively after stripping; any unknown name fails the whole file
with every unknown and every known name listed (a typo silently dropping a class is worse than a
failed slide).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

UNCLASSIFIED = "<unclassified>"


class LabelError(ValueError):
    """Labels cannot be derived; the message names the file (and line) at fault."""


def _norm(name: Any) -> str:
    return str(name).strip().casefold()


def class_index(class_names: Sequence[str]) -> dict[str, int]:
    """Normalised class name -> 0-based index into the multi-hot vector."""
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        key = _norm(name)
        if not key or key in index:
            raise LabelError(f"class names must be unique and non-empty, got {list(class_names)}")
        index[key] = i
    return index


class TileLabeler:
    """Labels tiles of one slide; build once per slide, call :meth:`label` per tile."""

    def __init__(
        self,
        n_classes: int,
        *,
        slide_label: np.ndarray | None = None,
        polygons: list[Any] | None = None,
        classes: np.ndarray | None = None,
        min_fraction: float = 0.1,
        source: str = "",
    ) -> None:
        self.n_classes = int(n_classes)
        self.min_fraction = float(min_fraction)
        self.source = source
        self._slide_label = slide_label
        self._polygons = polygons or []
        self._classes = classes if classes is not None else np.zeros(0, np.int64)
        self._poly_arr = np.empty(len(self._polygons), dtype=object)
        self._poly_arr[:] = self._polygons
        self._tree = None
        if self._polygons:
            import shapely

            self._tree = shapely.STRtree(self._polygons)

    @classmethod
    def from_geojson(cls, path: str | Path, class_names: list[str], min_fraction: float = 0.1) -> TileLabeler:
        """Outlines from a QuPath GeoJSON export; classification names map onto ``class_names``."""
        import shapely

        from pbip_engine.engine.annotations.geojson import read_annotations

        path = Path(path)
        if not 0.0 < min_fraction <= 1.0:
            raise LabelError(f"{path}: min_fraction must be in (0, 1], got {min_fraction}")
        index = class_index(class_names)
        try:
            annotations = read_annotations(path)
        except LabelError:
            raise
        except Exception as e:
            raise LabelError(f"{path}: cannot read annotations: {e}") from e
        per_class: dict[int, list[Any]] = {}
        unknown: set[str] = set()
        for ann in annotations:
            name = getattr(ann, "name", None)
            key = _norm(name) if name not in (None, "") else None
            if key is None or key not in index:
                unknown.add(UNCLASSIFIED if key is None else str(name).strip())
                continue
            geom = ann.geometry
            if geom is None or geom.is_empty:
                continue
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
            per_class.setdefault(index[key], []).append(geom)
        if unknown:
            raise LabelError(
                f"{path}: unknown annotation class name(s) {sorted(unknown)}; known classes are "
                f"{list(class_names)} (matched case-insensitively)"
            )
        polygons: list[Any] = []
        classes: list[int] = []
        for c, geoms in sorted(per_class.items()):
            # Union per class: overlapping outlines of one class must not count twice.
            merged = shapely.union_all(geoms)
            for part in _areal_parts(merged):
                polygons.append(part)
                classes.append(c)
        return cls(
            len(class_names),
            polygons=polygons,
            classes=np.asarray(classes, np.int64),
            min_fraction=min_fraction,
            source=str(path),
        )

    @classmethod
    def from_slide_labels(cls, labels: list[int]) -> TileLabeler:
        """Every tile gets the slide's multi-hot label (weak slide-level supervision)."""
        arr = np.asarray(labels)
        if arr.ndim != 1 or arr.size == 0 or not np.isin(arr, (0, 1)).all():
            raise LabelError(f"slide label must be a non-empty 0/1 multi-hot list, got {labels}")
        if not arr.any():
            raise LabelError(f"slide label {labels} marks no class present; nothing to learn from it")
        return cls(arr.size, slide_label=arr.astype(np.uint8))

    @property
    def has_annotations(self) -> bool:
        return bool(self._polygons)

    def label(self, x: int, y: int, size0: int) -> tuple[bool, np.ndarray]:
        """(labelled, multi-hot uint8 [n_classes]) for the level-0 square (x, y, size0)."""
        if self._slide_label is not None:
            return True, self._slide_label.copy()
        out = np.zeros(self.n_classes, np.uint8)
        if self._tree is None:
            return False, out
        import shapely

        tile = shapely.box(x, y, x + size0, y + size0)
        hits = self._tree.query(tile, predicate="intersects")
        if hits.size == 0:
            return False, out
        areas = shapely.area(shapely.intersection(self._poly_arr[hits], tile))
        cover = np.bincount(self._classes[hits], weights=areas, minlength=self.n_classes)
        out[cover / float(size0 * size0) >= self.min_fraction - 1e-12] = 1
        return bool(out.any()), out


def _areal_parts(geom: Any) -> list[Any]:
    import shapely

    parts = []
    for g in shapely.get_parts(geom):
        if g.geom_type == "Polygon":
            if g.area > 0:
                parts.append(g)
        elif hasattr(g, "geoms"):
            parts.extend(_areal_parts(g))
    return parts


def read_slide_label_csv(path: str | Path, class_names: list[str]) -> dict[str, list[int]]:
    """Per-slide multi-hot labels from a CSV.

    Two layouts: ``slide,<class>,<class>...`` with 0/1 columns (every class once, any order, names
    case-insensitive), or ``slide,labels`` with ``;``-separated class names (empty = none). ``slide`` is
    a file name or stem (see :func:`pbip_engine.engine.wsi.slides.lookup_by_slide`).
    """
    path = Path(path)
    index = class_index(class_names)
    n = len(class_names)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise LabelError(f"{path}: cannot read slide label CSV: {e}") from e
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if not header:
        raise LabelError(f"{path}: empty slide label CSV (need a header starting with `slide`)")
    cols = [_norm(c) for c in header]
    if cols[0] != "slide":
        raise LabelError(f"{path}:1: first column must be `slide`, got {header[0]!r}")
    if cols[1:] == ["labels"]:
        mode = "names"
    else:
        mode = "columns"
        unknown = [h.strip() for h, c in zip(header[1:], cols[1:], strict=True) if c not in index]
        missing = [name for name in class_names if _norm(name) not in cols[1:]]
        dup = len(set(cols[1:])) != len(cols[1:])
        if unknown or missing or dup:
            raise LabelError(
                f"{path}:1: header must be `slide,labels` or `slide` plus one 0/1 column per class "
                f"{list(class_names)}; unknown columns {unknown}, missing {missing}"
                + (", duplicated columns" if dup else "")
            )
    out: dict[str, list[int]] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != len(header):
            raise LabelError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
        slide = row[0].strip()
        if not slide:
            raise LabelError(f"{path}:{lineno}: empty slide name")
        if slide in out:
            raise LabelError(f"{path}:{lineno}: slide {slide!r} listed twice")
        vec = [0] * n
        if mode == "names":
            names = [s.strip() for s in row[1].split(";") if s.strip()]
            bad = [s for s in names if _norm(s) not in index]
            if bad:
                raise LabelError(f"{path}:{lineno}: unknown class name(s) {bad}; known {list(class_names)}")
            for s in names:
                vec[index[_norm(s)]] = 1
        else:
            for c, cell in zip(cols[1:], row[1:], strict=True):
                v = cell.strip()
                if v not in ("0", "1"):
                    raise LabelError(f"{path}:{lineno}: column {c!r} must be 0 or 1, got {cell!r}")
                vec[index[c]] = int(v)
        out[slide] = vec
    return out
