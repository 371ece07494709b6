"""Arrow schemas of every dataset the stages write, so readers and writers agree on one definition.

Coordinates are level-0 pixels of the slide. Labels are multi-hot over the spec's ``classes``
(index c-1 for class c; class 0 is background and never appears in labels).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


def tile_key(slide_id: str, x: int, y: int) -> str:
    """Stable id of a tile across stages (tiles -> embeddings -> bank members)."""
    return f"{slide_id}:{x}:{y}"


TILES = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("x", pa.int64(), nullable=False),
        pa.field("y", pa.int64(), nullable=False),
        pa.field("size0", pa.int32(), nullable=False),  # tile extent in level-0 pixels
        pa.field("tile_px", pa.int32(), nullable=False),  # stored tile edge in pixels
        pa.field("mpp", pa.float32(), nullable=False),  # µm/px of the stored pixels
        pa.field("level", pa.int16(), nullable=False),  # pyramid level read from
        pa.field("tissue_fraction", pa.float32(), nullable=False),
        pa.field("white_fraction", pa.float32(), nullable=False),
        pa.field("labelled", pa.bool_(), nullable=False),  # inside an annotation / slide label given
        pa.field("labels", pa.list_(pa.uint8()), nullable=False),  # multi-hot, len == n_classes
        pa.field("image", pa.binary(), nullable=False),  # JPEG bytes, RGB
    ],
    metadata={"pbip.dataset": "tiles", "pbip.schema_version": str(SCHEMA_VERSION)},
)


def embeddings_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("slide_id", pa.string(), nullable=False),
            pa.field("x", pa.int64(), nullable=False),
            pa.field("y", pa.int64(), nullable=False),
            pa.field("white_fraction", pa.float32(), nullable=False),
            pa.field("labelled", pa.bool_(), nullable=False),
            pa.field("labels", pa.list_(pa.uint8()), nullable=False),
            pa.field("embedding", pa.list_(value_type, dim), nullable=False),
            pa.field("encoder", pa.string(), nullable=False),
        ],
        metadata={"pbip.dataset": "embeddings", "pbip.schema_version": str(SCHEMA_VERSION)},
    )


PSEUDO_INDEX = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("x", pa.int64(), nullable=False),
        pa.field("y", pa.int64(), nullable=False),
        pa.field("mask_path", pa.string(), nullable=False),  # relative to the pseudo stage dir
        pa.field("labels", pa.list_(pa.uint8()), nullable=False),
    ],
    metadata={"pbip.dataset": "pseudo", "pbip.schema_version": str(SCHEMA_VERSION)},
)
