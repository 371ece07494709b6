"""Tile embedding: the callable Ray Data maps over the TILES dataset, and a Ray-free driver for it.

``Embedder`` is built once per actor (``map_batches(Embedder, fn_constructor_kwargs=...)``): it loads the
encoder once, decodes JPEG bytes on a thread pool (cv2 releases the GIL), moves uint8 pixels to the device
and normalises there, and runs the forward under ``inference_mode`` (bf16 autocast on CUDA). Decoding of
the next micro-batch overlaps the forward of the current one, so the stage runs close to forward speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np
import pyarrow as pa
import torch

from pbip_engine.engine.embed.encoders import EncoderError, create_encoder, encoder_id, resolve_device
from pbip_engine.schemas.datasets import TILES, embeddings_schema

PASSTHROUGH = ("tile_id", "slide_id", "x", "y", "white_fraction", "labelled", "labels")
REQUIRED = (*PASSTHROUGH, "image")
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}  # fmt: skip


class EmbedError(ValueError):
    """Bad tile batch (missing column, undecodable JPEG) or bad embedder configuration."""


def _apply_thread_env() -> None:
    """Honour OMP_NUM_THREADS for torch's intra-op pool (Ray sets it per worker from num_cpus)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


class Embedder:
    """Per-actor tile encoder: TILES batch (dict of numpy columns) -> embeddings batch.

    ``batch_size`` is the forward micro-batch; Ray's ``map_batches(batch_size=...)`` may hand over more rows.
    ``dtype`` is the stored embedding dtype (``float16`` halves the dataset, cosine error ~1e-3).
    ``encoder_kwargs`` go to :func:`create_encoder` and are folded into the encoder id.
    """

    def __init__(
        self,
        encoder: str,
        checkpoint: str | None,
        device: str = "auto",
        dtype: str = "float16",
        amp: bool = True,
        batch_size: int = 64,
        encoder_kwargs: dict | None = None,
        decode_threads: int | None = None,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise EmbedError(f"Embedder dtype must be 'float16' or 'float32', got {dtype!r}")
        if batch_size < 1:
            raise EmbedError(f"Embedder batch_size must be >= 1, got {batch_size}")
        _apply_thread_env()
        kw = dict(encoder_kwargs or {})
        self.device = resolve_device(device)
        self.model = create_encoder(encoder, checkpoint, **kw).to(self.device)
        self.info = self.model.info
        self.encoder_id = encoder_id(encoder, checkpoint, **kw)
        self.dtype = dtype
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.batch_size = int(batch_size)
        self.autocast = bool(amp) and self.device.type == "cuda"
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        n_threads = decode_threads or min(8, max(1, (os.cpu_count() or 2)))
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="jpeg")

    # ----------------------------------------------------------------------------------------- decoding

    def _decode_one(self, data: bytes, tile_id: str, reduce: int) -> np.ndarray:
        buf = np.frombuffer(data, dtype=np.uint8)
        img = cv2.imdecode(buf, _REDUCED[reduce]) if buf.size else None
        if img is None:
            raise EmbedError(f"tile {tile_id}: could not decode its JPEG image ({len(data)} bytes)")
        return img  # BGR; flipped to RGB when stacked

    def _reduce_factor(self, tile_px: int | None) -> int:
        """Largest JPEG DCT downscale (1/2/4/8) that still leaves >= input_size pixels: 4x less decode work."""
        if not tile_px:
            return 1
        s = self.info.input_size
        for r in (8, 4, 2):
            if tile_px // r >= s:
                return r
        return 1

    def _stack(self, imgs: list[np.ndarray]) -> np.ndarray:
        s = self.info.input_size
        if any(im.shape != imgs[0].shape for im in imgs):  # mixed tile sizes: resize here instead
            imgs = [
                im if im.shape[:2] == (s, s) else cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA)
                for im in imgs
            ]
        h, w = imgs[0].shape[:2]
        out = np.empty((len(imgs), h, w, 3), dtype=np.uint8)
        for i, im in enumerate(imgs):
            out[i] = im[:, :, ::-1]
        return out

    def _decoded_chunks(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[int, int, list[Future]]]:
        images, ids = batch["image"], batch["tile_id"]
        tile_px = batch.get("tile_px")
        reduce = self._reduce_factor(int(np.min(tile_px)) if tile_px is not None and len(tile_px) else None)
        futures = [
            self._pool.submit(self._decode_one, images[i], str(ids[i]), reduce) for i in range(len(images))
        ]
        for start in range(0, len(futures), self.batch_size):
            stop = min(start + self.batch_size, len(futures))
            yield start, stop, futures[start:stop]

    # ------------------------------------------------------------------------------------------ forward

    def forward_uint8(self, rgb: np.ndarray) -> np.ndarray:
        """``B,H,W,3`` uint8 RGB -> ``B,dim`` float32 numpy (used by the stage and by the benchmark)."""
        with torch.inference_mode():
            x = self.model.preprocess(rgb, device=self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                z = self.model(x)
            return z.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in REQUIRED if c not in batch]
        if missing:
            raise EmbedError(
                f"tile batch lacks column(s) {missing}; expected the TILES schema ({TILES.names})"
            )
        n = len(batch["tile_id"])
        emb = np.empty((n, self.info.dim), dtype=self.np_dtype)
        for start, stop, futs in self._decoded_chunks(batch):
            rgb = self._stack([f.result() for f in futs])
            z = self.forward_uint8(rgb)
            if z.shape != (stop - start, self.info.dim):
                raise EncoderError(
                    f"{self.encoder_id} returned shape {z.shape}, expected (B, {self.info.dim})"
                )
            emb[start:stop] = z
        out = {c: batch[c] for c in PASSTHROUGH}
        out["embedding"] = emb
        out["encoder"] = np.full(n, self.encoder_id, dtype=object)
        return out

    def schema(self) -> pa.Schema:
        """Arrow schema of what this embedder produces."""
        return embeddings_schema(self.info.dim, self.dtype)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _column_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


def to_embeddings_table(out: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Embedder output columns -> an Arrow table of ``schema`` (FixedSizeList embedding column)."""
    emb = np.ascontiguousarray(out["embedding"])
    dim = emb.shape[1]
    value_type = schema.field("embedding").type.value_type
    flat = pa.array(emb.reshape(-1), type=value_type)
    arrays = []
    for field in schema:
        if field.name == "embedding":
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
        elif field.name == "labels":
            arrays.append(pa.array([np.asarray(v, dtype=np.uint8) for v in out["labels"]], type=field.type))
        else:
            arrays.append(pa.array(out[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def embed_table(table: pa.Table, embedder: Embedder, batch_size: int) -> pa.Table:
    """No-Ray path: embed every row of a TILES table, ``batch_size`` rows per ``Embedder`` call."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise EmbedError(f"tiles table lacks column(s) {missing}; expected the TILES schema")
    schema = embedder.schema()
    cols = [c for c in (*REQUIRED, "tile_px") if c in table.column_names]
    parts = []
    for rb in table.select(cols).to_batches(max_chunksize=max(1, int(batch_size))):
        batch = {name: _column_numpy(rb.column(name)) for name in rb.schema.names}
        parts.append(to_embeddings_table(embedder(batch), schema))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts)
