"""Our own ``tiles/`` Parquet dataset (schema ``pbip_engine.schemas.datasets.TILES``) as training samples.

Only ``labelled`` tiles are kept by default (unlabelled tiles carry no image-level supervision). The JPEG
bytes stay compressed in memory and are decoded per sample, so a few hundred thousand tiles fit in RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pbip_engine.engine.ingest.datasets.common import DataError, decode_rgb
from pbip_engine.schemas.datasets import TILES

_NEEDED = ("tile_id", "labelled", "labels", "image")


def _parquet_files(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, Path)) else list(paths_or_dir)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(p.rglob("*.parquet")))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"tiles: {p} does not exist")
    if not files:
        raise DataError(f"tiles: no .parquet files in {paths_or_dir}")
    return files


class TileParquetDataset:
    """Samples ``{image, labels, name=tile_id}`` from tile Parquet files or a directory of them."""

    def __init__(
        self,
        paths_or_dir: str | Path | Sequence[str | Path],
        class_names: Sequence[str],
        *,
        labelled_only: bool = True,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.class_names = list(class_names)
        self.transform = transform
        n = len(self.class_names)
        ids: list[str] = []
        images: list[bytes] = []
        labels: list[np.ndarray] = []
        for f in _parquet_files(paths_or_dir):
            schema = pq.read_schema(f)
            missing = [c for c in _NEEDED if c not in schema.names]
            if missing:
                raise DataError(
                    f"{f}: not a tiles dataset, missing columns {missing} (schema: {TILES.names})"
                )
            t = pq.read_table(f, columns=list(_NEEDED))
            if labelled_only:
                t = t.filter(pc.equal(t["labelled"], True))
            if t.num_rows == 0:
                continue
            lab = t["labels"].combine_chunks()
            lengths = np.asarray(lab.value_lengths())
            bad = np.nonzero(lengths != n)[0]
            if bad.size:
                tid = t["tile_id"][int(bad[0])].as_py()
                raise DataError(
                    f"{f}: tile {tid!r} has {lengths[bad[0]]} labels but {n} classes were given {self.class_names}"
                )
            flat = np.asarray(lab.flatten(), dtype=np.float32).reshape(-1, n)
            ids.extend(t["tile_id"].to_pylist())
            images.extend(t["image"].to_pylist())
            labels.append(flat)
        if not ids:
            raise DataError(f"tiles: no {'labelled ' if labelled_only else ''}tiles in {paths_or_dir}")
        self.tile_ids, self._images = ids, images
        self.labels = np.concatenate(labels)

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        tid = self.tile_ids[i]
        sample = {"image": decode_rgb(self._images[i], tid), "labels": self.labels[i], "name": tid}
        return self.transform(sample) if self.transform else sample
