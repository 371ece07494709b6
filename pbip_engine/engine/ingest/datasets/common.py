"""Shared pieces of the stage-1 dataset adapters: decoding, label parsing, augmentation and batching.

A *sample* is a dict: ``image`` uint8 RGB ``H,W,3``, ``labels`` float32 multi-hot ``N`` (index c-1 for
class c), ``name`` str, and, for evaluation splits only, ``mask`` uint8 ``H,W`` (0 = background, k = class
k). ``iterate_batches`` stacks samples into the batch convention of ``engine.training.inputs``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pbip_engine.engine.io.decode import ImageDecodeError, decode_checked

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """A dataset file or folder that does not follow the expected layout/naming."""


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 RGB ``H,W,3`` of an image file (grey and RGBA are converted); a truncated or corrupt file is
    a DataError naming it, not a partly grey image to train on."""
    p = str(path)
    try:
        img = decode_checked(lambda: cv2.imread(p, cv2.IMREAD_COLOR))
    except ImageDecodeError as e:
        raise DataError(f"{p}: {e}") from None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes, name: str = "") -> np.ndarray:
    """uint8 RGB of encoded (JPEG/PNG) bytes; broken bytes are a DataError naming the tile."""
    try:
        img = decode_checked(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    except ImageDecodeError as e:
        raise DataError(f"{name or 'a tile'}: {e}") from None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_index_mask(path: str | Path) -> np.ndarray:
    """Class indices of a palettised or greyscale PNG (palette colours are ignored)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: mask must be a palettised or greyscale PNG, got PIL mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read mask {path}: {type(e).__name__}: {e}") from e


def remap_mask(mask: np.ndarray, lut: Sequence[int], path: str | Path) -> np.ndarray:
    """Map raw mask values through ``lut``; a value outside it is an error naming the file."""
    lut_arr = np.asarray(lut, dtype=np.uint8)
    if mask.size and int(mask.max()) >= len(lut_arr):
        raise DataError(f"{path}: mask value {int(mask.max())} outside the expected 0..{len(lut_arr) - 1}")
    return lut_arr[mask]


def labels_from_mask(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Multi-hot labels of the classes 1..N present in a mask in our convention."""
    present = np.unique(mask)
    y = np.zeros(n_classes, dtype=np.float32)
    for v in present:
        if 1 <= v <= n_classes:
            y[v - 1] = 1.0
    return y


_BRACKET = re.compile(r"\[([0-9 ]+)\]")


def parse_filename_labels(name: str, n_classes: int) -> np.ndarray:
    """Multi-hot labels from a file *name* (never a path): ``...[1100].png`` or ``...-[1 0 0 1].png``.

    BCSS-WSSS writes the digits without separators, LUAD-HistoSeg with spaces (as the MLPS, TPRO and PBIP loaders parse them); the last
    bracket group of the name is used, so brackets elsewhere in a name are harmless.
    """
    base = Path(name).name
    groups = _BRACKET.findall(base)
    if not groups:
        raise DataError(f"{base}: no '[...]' image-level label in the file name")
    raw = groups[-1].strip()
    digits = raw.split() if " " in raw else list(raw)
    if len(digits) != n_classes or any(d not in ("0", "1") for d in digits):
        raise DataError(f"{base}: label {raw!r} is not {n_classes} binary digits")
    return np.asarray([float(d) for d in digits], dtype=np.float32)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def random_flip_rot(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """One random symmetry of the square applied identically to ``image`` and ``mask`` (one sample)."""
    from pbip_engine.engine.training.augment import dihedral

    out = dict(sample)
    k = int(rng.integers(8))
    for key in ("image", "mask"):
        if key in out:
            out[key] = np.ascontiguousarray(dihedral(out[key], k))
    return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: arrays -> ``B,...`` numpy arrays, strings -> lists."""
    if not samples:
        raise DataError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], np.ndarray):
            shapes = {v.shape for v in vals}
            if len(shapes) > 1:
                names = [s.get("name", "?") for s in samples]
                raise DataError(
                    f"cannot stack '{key}' of different shapes {sorted(shapes)} (samples {names[:4]})"
                )
            out[key] = np.stack(vals)
        else:
            out[key] = vals
    return out


def iterate_batches(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: bool | Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Single-process batches from any ``len``/``__getitem__`` dataset, shuffled per ``(seed, epoch)``.

    ``rank``/``world_size`` take a strided shard (for DDP without a sampler); augmentation uses the same
    seeded generator, so an epoch is reproducible.
    """
    n = len(dataset)
    rng = np.random.default_rng([seed, epoch, rank])
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order[rank::world_size]
    aug = random_flip_rot if augment is True else (augment or None)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        samples = [dataset[int(i)] for i in idx]
        if aug is not None:
            samples = [aug(s, rng) for s in samples]
        yield collate(samples)
