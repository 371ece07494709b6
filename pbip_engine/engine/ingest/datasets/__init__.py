"""Stage-1 dataset adapters: every sample is a uint8 RGB tile + multi-hot label (+ mask for evaluation).

See ``common`` for the sample/batch convention and ``iterate_batches`` for a single-process loader.
"""

from __future__ import annotations

from pbip_engine.engine.ingest.datasets.common import (
    DataError,
    collate,
    iterate_batches,
    labels_from_mask,
    parse_filename_labels,
    random_flip_rot,
)
from pbip_engine.engine.ingest.datasets.folder_csv import FolderCSVDataset
from pbip_engine.engine.ingest.datasets.glas import GlaSImages, GlaSPatches
from pbip_engine.engine.ingest.datasets.tiles import TileParquetDataset
from pbip_engine.engine.ingest.datasets.wsss import BCSSWSSSDataset, LUADHistoSegDataset

__all__ = [
    "BCSSWSSSDataset",
    "DataError",
    "FolderCSVDataset",
    "GlaSImages",
    "GlaSPatches",
    "LUADHistoSegDataset",
    "TileParquetDataset",
    "collate",
    "iterate_batches",
    "labels_from_mask",
    "parse_filename_labels",
    "random_flip_rot",
]
