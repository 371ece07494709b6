"""Whole-slide readers behind one small interface: cuCIM first, tiffslide as the fallback.

Why a wrapper at all: the two libraries disagree on argument order, return types, failure modes and,
most dangerously, on the physical pixel size. cuCIM's ``spacing()`` reports ``1.0`` with an empty unit
for Aperio SVS, which an mpp-first tiler would take as 1 µm/px and tile at the wrong scale by 2x. This
module resolves mpp from trusted sources only (Aperio ``MPP``, TIFF resolution tags with a real unit,
``spacing()`` only when its unit is micrometres, or an explicit override) and refuses to guess.

Every problem with a slide becomes a :class:`SlideError` whose message starts with the slide path and
whose ``.reason`` is a short code, so a job over thousands of slides can tabulate failures.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from pbip_engine.engine.io.decode import captured_native_output, decoder_complaint

log = logging.getLogger(__name__)

CUCIM_EXTENSIONS = frozenset({".svs", ".tif", ".tiff"})
TIFFSLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff"})
DEFAULT_BACKENDS: tuple[str, ...] = ("cucim", "tiffslide")

# Physical pixel sizes outside this range are metadata garbage (e.g. a 72 dpi default tag), not slides.
MPP_PLAUSIBLE = (0.05, 100.0)
# Pyramid downsamples are stored as ratios of integer sizes (2.0005 for "2"): allow this slack when
# choosing a level so a nominal 2x level is not skipped for 0.03 % of resolution.
LEVEL_TOLERANCE = 0.01
# A slide may declare at most this many level-0 pixels per byte of its file. Real scans, even sparse ones
# that omit blank tiles, stay under ~1000; a few-KB header declaring 30000² pixels (a corrupt file, or a
# decompression bomb) would otherwise size arrays from the declared dimensions. 0 disables the check
# (spec: ``resources.max_slide_pixels_per_byte``).
MAX_PIXELS_PER_BYTE = 10_000
# Rows of level pixels per strip when a whole level is read for a thumbnail or tissue mask.
_STRIP_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


class SlideError(Exception):
    """A slide cannot be used; ``str()`` starts with the slide path, ``.reason`` is a short code.

    Reasons: ``missing``, ``unsupported_format``, ``unreadable``, ``read_failed``, ``no_mpp``,
    ``bad_mpp``, ``no_tissue``, ``closed``, ``implausible_size``.
    """

    def __init__(self, path: str | Path, reason: str, detail: str) -> None:
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:  # keep picklable across processes (Ray re-raises errors)
        return (type(self), (str(self.path), self.reason, self.detail))


# --------------------------------------------------------------------------------------------- backends


class _Backend:
    """What :class:`Slide` needs from a reader library (pixel reads only)."""

    name = ""
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class DecodeError(RuntimeError):
    """The backend's decoder reported a broken tile while returning pixels for it."""


class _CucimBackend(_Backend):
    name = "cucim"

    def __init__(self, path: Path) -> None:
        import pbip_engine

        if not pbip_engine.CUCIM_AVAILABLE:
            raise RuntimeError("cuCIM not loaded (torch was imported before pbip_engine)")
        from cucim.clara import CuImage  # already in sys.modules: pbip_engine preloaded it

        self._img = CuImage(str(path))
        res = self._img.resolutions
        self.level_dimensions = [(int(w), int(h)) for w, h in res["level_dimensions"]]
        self.level_downsamples = [float(d) for d in res["level_downsamples"]]
        md = self._img.metadata
        self.metadata: dict[str, Any] = json.loads(md) if isinstance(md, str) else dict(md)

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        with captured_native_output() as out:  # cuCIM's libjpeg reports a broken tile only on the console
            arr = np.asarray(self._img.read_region(location=list(location), size=list(size), level=level))
        detail = decoder_complaint(out)
        if detail is not None:
            raise DecodeError(f"cuCIM reported a tile it could not decode ({detail})")
        return arr

    def mpp(self) -> tuple[float | None, str]:
        aperio = self.metadata.get("aperio") or {}
        value = _as_float(aperio.get("MPP"))
        if _plausible(value):
            return value, "metadata:aperio"
        tiff = self.metadata.get("tiff") or {}
        value = _mpp_from_resolution(tiff.get("x_resolution"), tiff.get("resolution_unit"))
        if _plausible(value):
            return value, "metadata:tiff-resolution"
        spacing = list(self._img.spacing())
        units = list(self._img.spacing_units())
        # Dimension order of spacing() is the image's (Y, X, C); trust it only with a real unit.
        if len(spacing) >= 2 and len(units) >= 2 and units[1] in ("micrometer", "micron", "um", "µm"):
            value = float(spacing[1])
            if _plausible(value):
                return value, "metadata:cucim-spacing"
        return None, "none"

    def close(self) -> None:
        close = getattr(self._img, "close", None)
        if close is not None:
            close()


class _TiffslideBackend(_Backend):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._img = tiffslide.TiffSlide(str(path))
        self.level_dimensions = [(int(w), int(h)) for w, h in self._img.level_dimensions]
        self.level_downsamples = [float(d) for d in self._img.level_downsamples]
        self.properties = dict(self._img.properties)

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(self._img.read_region(location, level, size, as_array=True))

    def mpp(self) -> tuple[float | None, str]:
        value = _as_float(self.properties.get("aperio.MPP"))
        if _plausible(value):
            return value, "metadata:aperio"
        value = _mpp_from_resolution(
            self.properties.get("tiff.XResolution"), self.properties.get("tiff.ResolutionUnit")
        )
        if _plausible(value):
            return value, "metadata:tiff-resolution"
        value = _as_float(self.properties.get("tiffslide.mpp-x"))
        if _plausible(value):
            return value, "metadata:tiffslide"
        return None, "none"

    def close(self) -> None:
        self._img.close()


_BACKENDS: dict[str, tuple[type[_Backend], frozenset[str]]] = {
    "cucim": (_CucimBackend, CUCIM_EXTENSIONS),
    "tiffslide": (_TiffslideBackend, TIFFSLIDE_EXTENSIONS),
}


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _plausible(value: float | None) -> bool:
    return value is not None and MPP_PLAUSIBLE[0] <= value <= MPP_PLAUSIBLE[1]


def _mpp_from_resolution(resolution: Any, unit: Any) -> float | None:
    """µm/px from a TIFF X resolution (pixels per unit); None when the unit is missing or 'none'."""
    res = _as_float(resolution)
    if res is None or res <= 0:
        return None
    u = str(unit or "").strip().lower()
    if u in ("centimeter", "cm", "3"):
        return round(1e4 / res, 6)  # float32 tags: 0.4990000020 -> 0.499
    if u in ("inch", "2"):
        return round(25400.0 / res, 6)
    return None


# ------------------------------------------------------------------------------------------------ Slide


@dataclass
class Slide:
    """An open slide. Open it inside the worker that reads it: handles are never pickled."""

    path: Path
    backend: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    mpp_source: str
    _reader: _Backend | None = field(default=None, repr=False, compare=False)
    _held: tuple[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    # -- geometry ----------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is ≤ ``downsample`` (1 % slack): reading it never upsamples."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1.0 + LEVEL_TOLERANCE) and d >= self.level_downsamples[best]:
                best = i
        return best

    # -- pixels ------------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (H, W, 3) of ``size`` = (w, h) pixels at ``level``; ``location`` is level-0 (x, y)."""
        if self._reader is None:
            raise SlideError(self.path, "closed", "slide is closed")
        if not 0 <= level < self.level_count:
            raise SlideError(
                self.path, "read_failed", f"level {level} does not exist ({self.level_count} levels)"
            )
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        if self._held is not None and self._held[0] == level:
            ds = self.level_downsamples[level]
            lx, ly = math.floor(x / ds), math.floor(y / ds)  # the backends' own mapping
            lw, lh = self.level_dimensions[level]
            if lx >= 0 and ly >= 0 and lx + w <= lw and ly + h <= lh:
                return self._held[1][ly : ly + h, lx : lx + w].copy()
        try:
            arr = self._reader.read((x, y), level, (w, h))
        except Exception as e:
            raise SlideError(
                self.path,
                "read_failed",
                f"{self.backend} could not read region x={x} y={y} level={level} size={w}x{h}: "
                f"{type(e).__name__}: {e}",
            ) from e
        return _to_rgb(arr, self.path, (w, h))

    def hold_level(self, level: int) -> None:
        """Decode ``level`` whole, once; reads inside it are then served from memory.

        For small slides whose tissue pass and tiles read the same level (a one-level biopsy scan): the
        pass decodes every source tile anyway, and the tiles would decode them again.
        """
        w, h = self.level_dimensions[level]
        self._held = (level, self.read_region((0, 0), level, (w, h)))

    def read_scaled(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` (level-0 px per output px), read strip by strip.

        Why strips: a slide with only a 40x level would otherwise need tens of GB for one thumbnail.
        The output is ``round(W0/downsample) x round(H0/downsample)`` pixels, resized with INTER_AREA
        from the best level (never upsampled unless the slide has no coarse-enough level).
        """
        w0, h0 = self.dimensions
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        ds_level = self.level_downsamples[level]
        # Factor from level pixels to output pixels (≤ 1 normally).
        fx, fy = out_w / lw, out_h / lh
        rows_per_strip = max(1, int(_STRIP_BYTES // max(1, lw * 3)))
        # Make strips a whole number of output rows so the pieces tile exactly.
        out_rows = max(1, int(rows_per_strip * fy))
        out = np.empty((out_h, out_w, 3), np.uint8)
        oy = 0
        while oy < out_h:
            oh = min(out_rows, out_h - oy)
            ly0 = math.floor(oy / fy)
            ly1 = min(lh, max(ly0 + 1, math.ceil((oy + oh) / fy)))
            # ceil: backends map level-0 back with floor(y / ds), and ds is 2.0005 rather than 2.
            strip = self.read_region((0, math.ceil(ly0 * ds_level)), level, (lw, ly1 - ly0))
            interp = cv2.INTER_AREA if fx <= 1.0 else cv2.INTER_LINEAR
            out[oy : oy + oh] = cv2.resize(strip, (out_w, oh), interpolation=interp)
            oy += oh
        return out

    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB thumbnail whose longer side is ``max_size`` pixels (aspect ratio kept)."""
        w0, h0 = self.dimensions
        return self.read_scaled(max(w0, h0) / float(max_size))

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        self._held = None
        if self._reader is not None:
            try:
                self._reader.close()
            finally:
                self._reader = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            f"Slide({self.path}) holds an open file handle and cannot be pickled; pass the path and "
            "call open_slide() inside the worker that reads it"
        )


def _to_rgb(arr: np.ndarray, path: Path, size: tuple[int, int]) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(path, "read_failed", f"unexpected pixel array shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        raise SlideError(path, "read_failed", f"unsupported pixel type {arr.dtype} (need 8-bit RGB)")
    if (arr.shape[1], arr.shape[0]) != size:
        raise SlideError(
            path,
            "read_failed",
            f"reader returned {arr.shape[1]}x{arr.shape[0]} for a {size[0]}x{size[1]} read",
        )
    return np.ascontiguousarray(arr)


# -------------------------------------------------------------------------------------------- opening


def open_slide(
    path: str | Path,
    mpp_override: float | None = None,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE,
) -> Slide:
    """Open ``path`` with the first backend (in order) that supports its format and can read it.

    mpp comes from ``mpp_override`` when given, else from trusted metadata; a slide with neither raises
    ``SlideError(reason="no_mpp")`` rather than tiling at a guessed scale.
    """
    path = Path(path)
    check_slide_file(path)
    unknown = [b for b in backends if b not in _BACKENDS]
    if unknown:
        raise ValueError(f"unknown slide backend(s) {unknown}; choose from {sorted(_BACKENDS)}")
    if mpp_override is not None and not _plausible(_as_float(mpp_override)):
        raise SlideError(
            path, "bad_mpp", f"mpp override {mpp_override!r} is not a plausible µm/px value {MPP_PLAUSIBLE}"
        )
    ext = path.suffix.lower()
    candidates = [b for b in backends if ext in _BACKENDS[b][1]]
    if not candidates:
        supported = sorted(set().union(*(_BACKENDS[b][1] for b in backends)))
        raise SlideError(
            path,
            "unsupported_format",
            f"extension {ext!r} is not read by backends {list(backends)} ({supported})",
        )
    errors: list[str] = []
    for name in candidates:
        reader: _Backend | None = None
        try:
            reader = _BACKENDS[name][0](path)
            check_declared_size(path, reader.level_dimensions[0] if reader.level_dimensions else (0, 0),
                                max_pixels_per_byte)  # fmt: skip
            _check_reader(reader)
        except SlideError:
            if reader is not None:
                with contextlib.suppress(Exception):
                    reader.close()
            raise
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {e}".strip())
            if reader is not None:
                with contextlib.suppress(Exception):
                    reader.close()
            continue
        mpp, source = reader.mpp()  # type: ignore[attr-defined]
        if mpp_override is not None:
            if mpp is not None and abs(mpp - float(mpp_override)) > 0.05 * mpp:
                log.warning("%s: mpp override %.4f differs from %s %.4f", path, mpp_override, source, mpp)
            mpp, source = float(mpp_override), "override"
        if mpp is None:
            reader.close()
            raise SlideError(
                path,
                "no_mpp",
                "no trustworthy µm/px in the file (checked Aperio MPP, TIFF resolution tags with a unit, "
                "cuCIM spacing in micrometres); give one with the spec's mpp override CSV "
                f"(columns `slide,mpp`, e.g. `{path.name},0.25`) or open_slide(..., mpp_override=...)",
            )
        return Slide(
            path=path,
            backend=name,
            level_dimensions=list(reader.level_dimensions),
            level_downsamples=list(reader.level_downsamples),
            mpp=mpp,
            mpp_source=source,
            _reader=reader,
        )
    raise SlideError(path, "unreadable", "no backend could open it: " + "; ".join(errors))


def check_declared_size(path: Path, dimensions: tuple[int, int], max_pixels_per_byte: float) -> None:
    """Refuse a file whose header declares far more pixels than its bytes can hold (see MAX_PIXELS_PER_BYTE)."""
    if not max_pixels_per_byte:
        return
    w, h = (int(v) for v in dimensions)
    size = max(1, path.stat().st_size)
    if w * h > max_pixels_per_byte * size:
        raise SlideError(
            path,
            "implausible_size",
            f"declares {w}x{h} pixels in a {size}-byte file ({w * h / size:.0f} pixels per byte; real scans "
            f"stay far below {max_pixels_per_byte:.0f}): a corrupt header or a decompression bomb, not read. "
            "If the file is genuine, raise resources.max_slide_pixels_per_byte (0 = no check)",
        )


def check_slide_file(path: Path) -> None:
    """A SlideError for what is not a readable file: missing, a broken or looping link, a folder."""
    if not path.exists():
        if path.is_symlink():
            raise SlideError(path, "missing", f"broken or looping symbolic link (-> {os.readlink(path)})")
        raise SlideError(path, "missing", "file does not exist")
    if not path.is_file():
        raise SlideError(path, "unreadable", "not a regular file")


def _check_reader(reader: _Backend) -> None:
    """Reject handles that opened but hold no usable image, and probe one small read.

    A truncated SVS can "open" in tiffslide with zero pages; a probe read at the coarsest level catches
    files whose pixel data a backend cannot decode, so the next backend gets its chance.
    """
    if not reader.level_dimensions or any(w <= 0 or h <= 0 for w, h in reader.level_dimensions):
        raise ValueError(f"no image levels found ({reader.level_dimensions})")
    if len(reader.level_downsamples) != len(reader.level_dimensions):
        raise ValueError("level downsamples and dimensions disagree")
    level = len(reader.level_dimensions) - 1
    lw, lh = reader.level_dimensions[level]
    ds = reader.level_downsamples[level]
    pw, ph = min(16, lw), min(16, lh)
    cx, cy = (lw - pw) // 2, (lh - ph) // 2
    arr = reader.read((int(cx * ds), int(cy * ds)), level, (pw, ph))
    if np.asarray(arr).size == 0:
        raise ValueError("probe read returned no pixels")


# ----------------------------------------------------------------------------------- override tables


def slide_keys(path: str | Path) -> tuple[str, str]:
    """The names a per-slide table may use for ``path``: file name, then stem."""
    p = Path(path)
    return p.name, p.stem


def lookup_by_slide(table: Mapping[str, T], path: str | Path) -> T | None:
    """Value for ``path`` in a table keyed by file name or stem (exact name wins)."""
    for key in slide_keys(path):
        if key in table:
            return table[key]
    return None


def read_mpp_overrides(csv_path: str | Path) -> dict[str, float]:
    """Read a ``slide,mpp`` CSV; ``slide`` is a file name or stem. Errors name the file and line."""
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"{csv_path}: cannot read mpp override CSV: {e}") from e
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise ValueError(f"{csv_path}: empty mpp override CSV (need a header `slide,mpp`)")
    cols = [c.strip().lower() for c in header]
    if "slide" not in cols or "mpp" not in cols:
        raise ValueError(f"{csv_path}:1: header must contain `slide` and `mpp`, got {header}")
    i_slide, i_mpp = cols.index("slide"), cols.index("mpp")
    out: dict[str, float] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) <= max(i_slide, i_mpp):
            raise ValueError(f"{csv_path}:{lineno}: expected {len(cols)} columns, got {row}")
        slide = row[i_slide].strip()
        mpp = _as_float(row[i_mpp].strip())
        if not slide:
            raise ValueError(f"{csv_path}:{lineno}: empty slide name")
        if not _plausible(mpp):
            raise ValueError(
                f"{csv_path}:{lineno}: mpp {row[i_mpp]!r} for {slide!r} is not a µm/px value in {MPP_PLAUSIBLE}"
            )
        if slide in out:
            raise ValueError(f"{csv_path}:{lineno}: slide {slide!r} listed twice")
        out[slide] = float(mpp)  # type: ignore[arg-type]
    return out
