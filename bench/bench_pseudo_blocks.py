"""Peak memory of the pseudo stage on one slide labelled throughout, read in blocks vs as one canvas.

    python bench/bench_pseudo_blocks.py                              # 6144-px slide: block 4096 vs one canvas
    python bench/bench_pseudo_blocks.py --side 12288 --block-px 4096 2048

With slide-level labels every tissue tile is labelled, so the pseudo stage's canvases span the whole section
(``engine/pseudo/blocks.py``). This runs the stage's per-slide function (``jobs.pseudo.RegionPseudo.slide``,
Ray-free) on a synthetic slide of ``--side`` canvas px tiled every half tile, with a stand-in CAM model (box
means of the pixels, ``--classes`` maps, features at stride 8 for ``pseudo.image_prototypes``) so that what is
measured is the stage's own canvases, not a network. Each setting runs in its own process; reported: wall time
and the peak RSS above the process's state after the tiles were made, as ratios to the first setting
(``--block-px 0`` = one canvas, the stage before ``pseudo.block_px``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from child_process import report, run_child

ONE_CANVAS = 1 << 30  # a block larger than any slide: the whole slide is one block


def _tiles(side: int, tile_px: int, seed: int = 0) -> dict:
    """The tile rows of a ``side``-px slide cut every half tile (JPEG bytes, as the tile stage writes them)."""
    import cv2

    from pbip_engine.engine.ingest.tile_slide import encode_jpeg

    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 230, (side // 64 + 2, side // 64 + 2, 3), dtype=np.uint8)
    picture = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_LINEAR)
    step = tile_px // 2
    starts = range(0, side - tile_px + 1, step)
    rows = [(x, y) for y in starts for x in starts]
    return {
        "tile_id": np.array([f"s:{x}_{y}" for x, y in rows], dtype=object),
        "slide_id": np.array(["s"] * len(rows), dtype=object),
        "x": np.array([x for x, _ in rows]), "y": np.array([y for _, y in rows]),
        "size0": np.full(len(rows), tile_px),
        "labels": np.ones((len(rows), 4), np.uint8),
        "image": np.array([encode_jpeg(picture[y : y + tile_px, x : x + tile_px], 90) for x, y in rows],
                          dtype=object),
    }  # fmt: skip


class _BoxModel:
    """CAMs: ``n`` box-mean maps of the pixels' channels; features: 32 channels at stride 8 (unit vectors)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def max_region_px(self, tile_px: int) -> None:
        return None  # no cap: the pseudo stage's region_px windows

    def predict_region(self, image, tile_px, options, features):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        chans = torch.cat([x[:, [i % 3]] * (1 + i) for i in range(self.n)], 1)
        cams = F.avg_pool2d(F.pad(chans, (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0]
        cams = cams / cams.amax((1, 2), keepdim=True).clamp_min(1e-6)
        feats = []
        if features:
            f = F.avg_pool2d(x, 8).repeat(1, 11, 1, 1)[:, :32] + 0.01
            feats = [F.normalize(f, dim=1)[0].half().numpy()]
        return cams.numpy(), feats, [1.0] if features else []


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import pbip_engine.jobs.pseudo as job
    from pbip_engine.schemas.spec import parse_spec

    F.avg_pool2d(torch.zeros(1, 3, 16, 16), 5, stride=1)  # torch's own memory belongs to the baseline
    batch = _tiles(args.side, args.tile_px)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    raw = {
        "run": {"name": "bench", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": f"c{i}", "color": [40 * i, 80, 120]} for i in range(4)],
        "tiling": {"tile_px": args.tile_px, "overlap": 0.5},
        "pseudo": {"background": "white", "block_px": args.block_px or ONE_CANVAS,
                   "image_prototypes": 0.5 if args.features else 0},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_pseudo_blocks.") as tmp:
        spec = parse_spec(raw, Path(tmp))
        job._cam_model = lambda *a: _BoxModel(4)  # the stand-in CAM model
        t0 = time.perf_counter()
        rows = job.RegionPseudo(spec, "model.pt", None, tmp).slide(batch)
        wall = time.perf_counter() - t0
        regions = len(list((Path(tmp) / "regions").glob("*.parquet")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report({"tiles": len(rows["tile_id"]), "wall_s": wall, "peak_mb": peak, "base_mb": base,
            "region_files": regions})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=6144, help="slide side in canvas px (px at tiling.mpp)")
    ap.add_argument("--tile-px", type=int, default=96)
    ap.add_argument("--block-px", type=int, nargs="+", default=[0, 4096],
                    help="pseudo.block_px values, one run each; 0 = one canvas (the baseline of the ratios)")  # fmt: skip
    ap.add_argument("--no-features", dest="features", action="store_false", help="pseudo.image_prototypes: 0")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.block_px = args.block_px[0]
        worker(args)
        return
    results = []
    for block in args.block_px:
        cmd = [sys.executable, __file__, "--worker", "--side", str(args.side), "--tile-px", str(args.tile_px),
               "--block-px", str(block)] + ([] if args.features else ["--no-features"])  # fmt: skip
        r = run_child(cmd)
        results.append(r)
        name = "one canvas" if block == 0 else f"block_px {block}"
        print(f"{name:>15}: {r['tiles']} tiles, {r['region_files']} region file(s), wall {r['wall_s']:.1f} s, "
              f"peak RSS {r['peak_mb']:.0f} MB ({r['peak_mb'] - r['base_mb']:.0f} MB above the tiles' "
              f"{r['base_mb']:.0f})")  # fmt: skip
    first = results[0]
    for block, r in zip(args.block_px[1:], results[1:], strict=True):
        print(f"block_px {block} / {'one canvas' if args.block_px[0] == 0 else args.block_px[0]}: "
              f"wall {r['wall_s'] / first['wall_s']:.2f}x, memory above the tiles "
              f"{(r['peak_mb'] - r['base_mb']) / max(first['peak_mb'] - first['base_mb'], 1e-9):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
