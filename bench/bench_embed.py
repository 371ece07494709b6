"""Embedding stage throughput vs the encoder's forward alone.

    python bench/bench_embed.py [--encoder efficientnet_lite0|vit_b16|<registry name>] [--device cpu|cuda]
                                [--n 256] [--tile-px 224] [--batch 64] [--repeats 2]

(a) forward alone: preprocess + forward on an in-memory uint8 batch (what the model costs);
(b) ``embed_table`` end to end: JPEG decode (thread pool) + preprocess + forward + Arrow output.
Prints tiles/s for both and the ratio b/a (target >= 0.8). ``vit_b16`` = ``timm:vit_base_patch16_224``,
random init (no weights needed). bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import pyarrow as pa
import torch

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.embedder import Embedder, embed_table
from pbip_engine.schemas.datasets import TILES, tile_key

ALIASES = {"vit_b16": ("timm:vit_base_patch16_224", {"random_init": True})}


def synthetic_tiles(n: int, px: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Tissue-like textured tiles (smoothed noise, so JPEG sizes are realistic) as a TILES table."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, px, px, 3), dtype=np.uint8)
    base = np.stack([cv2.GaussianBlur(b, (0, 0), 2.0) for b in base])
    imgs = np.stack([np.roll(base[i % 8], i, axis=0) for i in range(n)])
    jpegs = [cv2.imencode(".jpg", im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in imgs]
    cols = {
        "tile_id": [tile_key("bench", i * px, 0) for i in range(n)],
        "slide_id": ["bench"] * n,
        "x": [i * px for i in range(n)],
        "y": [0] * n,
        "size0": [px] * n,
        "tile_px": [px] * n,
        "mpp": [0.5] * n,
        "level": [0] * n,
        "tissue_fraction": [1.0] * n,
        "white_fraction": [0.0] * n,
        "labelled": [True] * n,
        "labels": [[1, 0, 0, 0]] * n,
        "image": jpegs,
    }
    return pa.Table.from_pydict(cols, schema=TILES), imgs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    name, kw = ALIASES.get(a.encoder, (a.encoder, {}))
    emb = Embedder(name, a.checkpoint, device=a.device, batch_size=a.batch, encoder_kwargs=kw)
    table, imgs = synthetic_tiles(a.n, a.tile_px)
    dev = emb.device

    emb.forward_uint8(imgs[: min(a.batch, a.n)])  # warm-up (cudnn autotune, allocator)
    _sync(dev)
    fwd, e2e = [], []
    for _ in range(a.repeats):  # interleaved, min of repeats: robust to other load on a shared host
        t0 = time.perf_counter()
        for s in range(0, a.n, a.batch):
            emb.forward_uint8(imgs[s : s + a.batch])
        _sync(dev)
        fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = embed_table(table, emb, batch_size=max(a.batch, 256))
        _sync(dev)
        e2e.append(time.perf_counter() - t0)
    assert out.num_rows == a.n
    f_tps, e_tps = a.n / min(fwd), a.n / min(e2e)
    print(
        json.dumps(
            {
                "encoder": emb.encoder_id,
                "device": str(dev),
                "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                "torch_threads": torch.get_num_threads(),
                "n": a.n,
                "tile_px": a.tile_px,
                "input_size": emb.info.input_size,
                "batch": a.batch,
                "jpeg_kib_mean": round(
                    sum(len(b) for b in table.column("image").to_pylist()) / a.n / 1024, 1
                ),
                "forward_tiles_per_s": round(f_tps, 1),
                "embed_table_tiles_per_s": round(e_tps, 1),
                "ratio": round(e_tps / f_tps, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
