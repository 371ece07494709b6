"""Streaming writer for tiled pyramidal TIFFs (slides and label masks).

One writer serves both the synthetic slides and the stitched prediction masks. It never holds a whole
level in memory: level 0 is pulled tile row by tile row from a callback, and each reduced level is built
from the band just written, kept in RAM only while small and otherwise spilled to a raw temporary file
next to the output. Peak memory is therefore O(tile rows x width), not O(slide).

Layouts (see PEERS.md section 5):

* ``ome=False`` -- generic pyramid (layout B): consecutive top-level IFDs, reduced levels flagged
  ``subfiletype=1``. Read by OpenSlide/QuPath, tiffslide, cuCIM (RGB only), libvips.
* ``ome=True`` -- OME-TIFF with SubIFDs (layout A) for Bio-Formats/QuPath's OME reader. OpenSlide does
  not see SubIFD levels.

The physical pixel size is written as XResolution/YResolution in pixels per CENTIMETER
(``1e4 / mpp``, halved per level); tiffslide (``tiffslide.mpp-x``) and cuCIM (``CuImage.spacing()``)
both read it from there. No Aperio-style description is written on purpose: it would make cuCIM take
the Aperio path, whose ``spacing()`` reports 1.0.

Label pyramids (``kind="labels"``) are uint8 class indices (0 = background, k = k-th class), deflate
compressed and reduced by the 2x2 *mode* so that no reduced level ever contains a class value that is
not a real class (a mean would). Class names and colours are stored as OME ``MapAnnotation``s
(namespaces :data:`OME_NS_NAMES`, :data:`OME_NS_COLORS`) when ``ome=True``, and as a JSON object after
the ``pbip-engine `` prefix of the ImageDescription otherwise; :func:`read_label_classes` reads both.

Files appear atomically: everything is written to a temporary name in the target directory, fsynced
and ``os.replace``d into place; on any error the temporary and spill files are removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

import cv2
import numpy as np
import tifffile

from pbip_engine.engine.io.atomic import atomic_path

__all__ = [
    "OME_NS_COLORS",
    "OME_NS_NAMES",
    "TiffWriterError",
    "downsample_labels_mode",
    "pyramid_shapes",
    "read_label_classes",
    "write_pyramid",
]

ReadTile = Callable[[int, int, int, int], np.ndarray]
"""``read_tile(x, y, width, height) -> array (height, width[, 3])`` in level-0 pixels."""

OME_NS_NAMES = "pbip-engine/class-names"
OME_NS_COLORS = "pbip-engine/class-colors"
DESCRIPTION_PREFIX = "pbip-engine "
SPILL_BYTES = 64 * 1024 * 1024  # reduced levels larger than this go to a temporary file


class TiffWriterError(ValueError):
    """Bad arguments or source data for :func:`write_pyramid` (the message names the output file)."""


def pyramid_shapes(shape: tuple[int, int], min_size: int = 512) -> list[tuple[int, int]]:
    """(height, width) of every level: each half the previous (rounded up) until both sides <= min_size."""
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    shapes = [(h, w)]
    while max(h, w) > min_size:
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    return shapes


def downsample_labels_mode(labels: np.ndarray) -> np.ndarray:
    """2x2 mode reduction of a uint8 label image; ties go to the larger class value.

    Ties favour the larger value (so a thin foreground structure beats background, as dlup's max-pool
    does) while a clear majority still wins (unlike max-pool, which lets one stray pixel spread).
    Odd sizes are edge-padded, so the result is ceil(h/2) x ceil(w/2).
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    h, w = labels.shape
    if h % 2 or w % 2:
        labels = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    a = labels[0::2, 0::2]
    b = labels[0::2, 1::2]
    c = labels[1::2, 0::2]
    d = labels[1::2, 1::2]
    best = None
    best_key = None
    for v, o1, o2, o3 in ((a, b, c, d), (b, a, c, d), (c, a, b, d), (d, a, b, c)):
        count = (v == o1).astype(np.uint16) + (v == o2) + (v == o3)
        key = count * 256 + v
        if best is None:
            best, best_key = v.copy(), key
        else:
            take = key > best_key
            best[take] = v[take]
            best_key = np.maximum(best_key, key)
    return best


def _downsample(band: np.ndarray, kind: str) -> np.ndarray:
    if kind == "labels":
        return downsample_labels_mode(band)
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return cv2.resize(band, (band.shape[1] // 2, band.shape[0] // 2), interpolation=cv2.INTER_AREA)


class _LevelStore:
    """Append-only row store for one reduced level: RAM while small, else a raw file beside the output."""

    def __init__(self, shape: tuple[int, ...], spill_path: Path, spill_bytes: int) -> None:
        self.shape = shape
        self.row_bytes = int(np.prod(shape[1:]))
        self.rows = 0
        self.path: Path | None = None
        self._fh = None
        if self.row_bytes * shape[0] <= spill_bytes:
            self._array: np.ndarray | None = np.empty(shape, np.uint8)
        else:
            self._array = None
            self.path = spill_path
            self._fh = open(spill_path, "w+b")  # noqa: SIM115 - closed in close()

    def append(self, band: np.ndarray) -> None:
        n = band.shape[0]
        if band.shape[1:] != self.shape[1:] or self.rows + n > self.shape[0]:
            raise AssertionError(f"band {band.shape} does not fit level {self.shape} at row {self.rows}")
        if self._array is not None:
            self._array[self.rows : self.rows + n] = band
        else:
            self._fh.write(np.ascontiguousarray(band, np.uint8).tobytes())
        self.rows += n

    def read_rows(self, y: int, h: int) -> np.ndarray:
        if self._array is not None:
            return self._array[y : y + h]
        self._fh.flush()
        buf = os.pread(self._fh.fileno(), h * self.row_bytes, y * self.row_bytes)
        return np.frombuffer(buf, np.uint8).reshape((h, *self.shape[1:]))

    def close(self) -> None:
        self._array = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(value: str) -> str:
    """``value`` escaped for XML text or a double-quoted attribute; characters XML 1.0 forbids dropped."""
    return escape(_XML_INVALID.sub("", str(value)), {'"': "&quot;"})


def _ome_xml(
    shape: tuple[int, int], mpp: float, kind: str, names: list[str] | None, colors: list | None, name: str
) -> bytes:
    """Minimal OME-XML (2016-06) for one 2-D image; class table as two MapAnnotations.

    Returned as UTF-8 bytes, which is what the OME-TIFF specification puts in ImageDescription and what
    Bio-Formats decodes: a ``str`` with a non-ASCII class or slide name is refused by tifffile (TIFF ASCII
    tags are 7-bit), and character references (``&#233;``) are mangled by Bio-Formats' XML sanitiser
    (which also made it fall back to its plain TIFF reader, flat, when the unit was written ``&#181;m``).
    """
    h, w = shape
    samples = 3 if kind == "rgb" else 1
    size_c = samples
    channel_name = "RGB" if kind == "rgb" else "labels"
    refs, annotations = "", ""
    if kind == "labels" and names is not None:
        entries = [("0", "background"), *((str(i + 1), n) for i, n in enumerate(names))]
        m = "".join(f'<M K="{k}">{_xml_text(v)}</M>' for k, v in entries)
        annotations += (
            f'<MapAnnotation ID="Annotation:0" Namespace="{OME_NS_NAMES}"><Value>{m}</Value></MapAnnotation>'
        )
        refs += '<AnnotationRef ID="Annotation:0"/>'
        if colors is not None:
            m = "".join(f'<M K="{i + 1}">#{r:02x}{g:02x}{b:02x}</M>' for i, (r, g, b) in enumerate(colors))
            annotations += f'<MapAnnotation ID="Annotation:1" Namespace="{OME_NS_COLORS}"><Value>{m}</Value></MapAnnotation>'
            refs += '<AnnotationRef ID="Annotation:1"/>'
    sa = f"<StructuredAnnotations>{annotations}</StructuredAnnotations>" if annotations else ""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" Creator="pbip-engine">'
        f'<Image ID="Image:0" Name="{_xml_text(name)}">'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="{w}" SizeY="{h}" '
        f'SizeC="{size_c}" SizeZ="1" SizeT="1" Interleaved="{"true" if samples > 1 else "false"}" '
        f'PhysicalSizeX="{mpp!r}" PhysicalSizeXUnit="\u00b5m" PhysicalSizeY="{mpp!r}" PhysicalSizeYUnit="\u00b5m">'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="{samples}" Name="{channel_name}"/>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        f"</Pixels>{refs}</Image>{sa}</OME>"
    )
    return xml.encode("utf-8")


def read_label_classes(path: str | os.PathLike) -> list[tuple[str, tuple[int, int, int] | None]] | None:
    """Class table ``[(name, rgb | None), ...]`` for values 1..n stored by :func:`write_pyramid`, or None."""
    import xml.etree.ElementTree as ET

    with tifffile.TiffFile(path) as tf:
        desc = tf.pages[0].description or ""
    if desc.startswith(DESCRIPTION_PREFIX):
        meta = json.loads(desc[len(DESCRIPTION_PREFIX) :])
        names = meta.get("class_names")
        if names is None:
            return None
        colors = meta.get("class_colors") or [None] * len(names)
        return [(n, tuple(c) if c is not None else None) for n, c in zip(names, colors, strict=True)]
    if desc.rstrip().endswith("OME>"):
        root = ET.fromstring(desc)
        ns = {"o": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
        tables: dict[str, dict[int, str]] = {}
        for ma in root.iterfind(".//o:StructuredAnnotations/o:MapAnnotation", ns):
            tables[ma.get("Namespace", "")] = {
                int(m.get("K")): (m.text or "") for m in ma.iterfind("o:Value/o:M", ns)
            }
        names_t = tables.get(OME_NS_NAMES)
        if not names_t:
            return None
        colors_t = tables.get(OME_NS_COLORS, {})
        out = []
        for k in sorted(v for v in names_t if v > 0):
            c = colors_t.get(k)
            rgb = (int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)) if c else None
            out.append((names_t[k], rgb))
        return out
    return None


def _check_tile(t: np.ndarray, want: tuple[int, ...], where: str, path: Path) -> np.ndarray:
    t = np.asarray(t)
    if t.shape != want:
        raise TiffWriterError(f"{path}: source returned shape {t.shape} for {where}, expected {want}")
    if t.dtype != np.uint8:
        if not np.issubdtype(t.dtype, np.integer) or (t.size and (t.min() < 0 or t.max() > 255)):
            raise TiffWriterError(f"{path}: source returned {t.dtype} values outside uint8 for {where}")
        t = t.astype(np.uint8)
    return t


def write_pyramid(
    path: str | os.PathLike,
    read_tile: ReadTile | np.ndarray,
    shape: tuple[int, int],
    mpp: float,
    *,
    kind: Literal["rgb", "labels"],
    tile: int = 256,
    min_size: int = 512,
    compression: str | None = None,
    ome: bool = False,
    class_names: list[str] | None = None,
    class_colors: list[tuple[int, int, int]] | None = None,
    quality: int = 90,
    maxworkers: int = 1,
    bigtiff: bool | None = None,
    spill_bytes: int = SPILL_BYTES,
) -> list[tuple[int, int]]:
    """Write a tiled pyramidal TIFF from a tile callback (or a small array); return the level shapes.

    ``read_tile(x, y, w, h)`` is called once per level-0 tile in row-major order with level-0 pixel
    coordinates and must return ``(h, w, 3)`` uint8 for ``kind="rgb"`` or ``(h, w)`` uint8 class
    indices for ``kind="labels"``. ``shape`` is (height, width). Returned shapes are (height, width)
    per level. ``class_names``/``class_colors`` describe values 1..n (0 is always background).
    ``compression`` defaults to JPEG for RGB and zlib (deflate) for labels; JPEG labels are refused.
    ``bigtiff`` defaults to True when the raw level 0 exceeds 2 GiB.
    """
    path = Path(path)
    if kind not in ("rgb", "labels"):
        raise TiffWriterError(f"{path}: kind must be 'rgb' or 'labels', got {kind!r}")
    if tile < 16 or tile % 16:
        raise TiffWriterError(f"{path}: tile must be a positive multiple of 16, got {tile}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise TiffWriterError(f"{path}: mpp must be a positive number, got {mpp}")
    try:
        shapes = pyramid_shapes(shape, min_size)
    except ValueError as e:
        raise TiffWriterError(f"{path}: {e}") from None
    if compression is None:
        compression = "jpeg" if kind == "rgb" else "zlib"
    compression = compression.lower()
    if kind == "labels" and compression in ("jpeg", "jpegxl", "jpeg2000", "webp", "lerc"):
        raise TiffWriterError(f"{path}: lossy compression {compression!r} would corrupt class labels")
    if class_names is not None and class_colors is not None and len(class_names) != len(class_colors):
        raise TiffWriterError(f"{path}: {len(class_names)} class names but {len(class_colors)} colours")
    channels = (3,) if kind == "rgb" else ()
    if isinstance(read_tile, np.ndarray):
        arr = read_tile
        if arr.shape != (*shape, *channels):
            raise TiffWriterError(f"{path}: array shape {arr.shape} != {(*shape, *channels)}")
        read_tile = lambda x, y, w, h: arr[y : y + h, x : x + w]  # noqa: E731
    if bigtiff is None:
        bigtiff = shapes[0][0] * shapes[0][1] * max(1, len(channels)) > 2**31 - 2**25
    if not path.parent.is_dir():
        raise TiffWriterError(f"{path}: output directory does not exist")

    token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    stores: list[_LevelStore] = []
    try:
        for k, s in enumerate(shapes[1:], start=1):
            stores.append(
                _LevelStore((*s, *channels), path.with_name(f".{path.name}.{token}.l{k}.spill"), spill_bytes)
            )

        def level0_band(y: int, bh: int) -> np.ndarray:
            w0 = shapes[0][1]
            band = np.empty((bh, w0, *channels), np.uint8)
            for x in range(0, w0, tile):
                tw = min(tile, w0 - x)
                band[:, x : x + tw] = _check_tile(
                    read_tile(x, y, tw, bh), (bh, tw, *channels), f"tile x={x} y={y}", path
                )
            return band

        def tiles(level: int) -> Iterator[np.ndarray]:
            h, w = shapes[level]
            nxt = stores[level] if level < len(stores) else None
            for y in range(0, h, tile):
                bh = min(tile, h - y)
                band = level0_band(y, bh) if level == 0 else stores[level - 1].read_rows(y, bh)
                # Reduce before yielding: tifffile stops pulling after the last tile, so code placed
                # after the final yield would never run.
                if nxt is not None:
                    nxt.append(_downsample(band, kind))
                for x in range(0, w, tile):
                    t = band[:, x : x + tile]
                    if t.shape[0] != tile or t.shape[1] != tile:
                        pad = ((0, tile - t.shape[0]), (0, tile - t.shape[1])) + ((0, 0),) * len(channels)
                        t = np.pad(t, pad, mode="edge") if kind == "rgb" else np.pad(t, pad)
                    yield t

        def s_next(level: int) -> int:
            return shapes[level + 1][0]

        photometric = "rgb" if kind == "rgb" else "minisblack"
        compressionargs = {"level": int(quality)} if compression == "jpeg" else None
        if kind == "labels" and not ome:
            meta = {"kind": "labels", "mpp": mpp, "class_names": class_names, "class_colors": class_colors}
            description = DESCRIPTION_PREFIX + json.dumps(meta, separators=(",", ":"))
        elif ome:
            description = _ome_xml(shapes[0], mpp, kind, class_names, class_colors, path.name)
        else:
            description = f"pbip-engine pyramidal TIFF; kind=rgb; mpp={mpp!r}; levels={len(shapes)}"
        common = dict(
            tile=(tile, tile),
            photometric=photometric,
            compression=compression,
            compressionargs=compressionargs,
            resolutionunit="CENTIMETER",
            dtype=np.uint8,
            metadata=None,
            maxworkers=maxworkers,
            datetime=None,
            software="pbip-engine",
        )
        with (
            atomic_path(path, sync_dir=True) as tmp,
            open(tmp, "wb") as fh,
            tifffile.TiffWriter(fh, bigtiff=bigtiff, ome=False) as tw,
        ):
            for level, s in enumerate(shapes):
                res = 1e4 / (mpp * 2**level)
                extra = {}
                if level == 0:
                    extra["description"] = description
                    if ome and len(shapes) > 1:
                        extra["subifds"] = len(shapes) - 1
                else:
                    extra["subfiletype"] = 1
                tw.write(tiles(level), shape=(*s, *channels), resolution=(res, res), **common, **extra)
                if level > 0:
                    stores[level - 1].close()  # free RAM / disk of the level just written
                if level < len(stores) and stores[level].rows != s_next(level):
                    raise AssertionError(f"{path}: level {level + 1} got {stores[level].rows} rows")
    finally:
        for s in stores:
            s.close()
    return shapes
