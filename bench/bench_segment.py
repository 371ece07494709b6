"""Whole-slide segmentation throughput and peak memory: plan -> predict -> stitch -> write, one process.

    python bench/bench_segment.py                          # 50k x 50k synthetic slide, tiny CNN, CPU
    python bench/bench_segment.py --size 8000              # quick run
    python bench/bench_segment.py --model deeplabv2 --device cuda --batch-size 64
    python bench/bench_segment.py --overlap 0.25 0.5       # each overlap on the same slide; ratios to the first

The slide is a JPEG pyramid written with engine.tiff_writer from a cheap procedural pattern (glass with
large H&E-coloured discs, two "tissue types" per disc): engine.synth renders ~4 s per megapixel, i.e.
hours for 50k x 50k. Segmentation runs in a child process so that its peak RSS (``ru_maxrss``) is the
figure reported, not the slide writer's. Reported: tissue megapixels/s (level-0 tissue area / wall
time), tiles/s, the time split (inference, stitching, writing; reading overlaps inference in a
prefetch thread) and peak RSS of the segmenting process.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from child_process import report, run_child

import pbip_engine
from pbip_engine.engine.inference import SEGMENT_OVERLAP


def _warm_cucim() -> None:
    """Run cuCIM's GDS initialiser before torch is imported (a first CuImage after torch hangs)."""
    if not pbip_engine.CUCIM_AVAILABLE:
        return
    from cucim.clara import CuImage

    with contextlib.suppress(Exception):
        CuImage("/nonexistent/warm-up.tif")


_warm_cucim()

import numpy as np  # noqa: E402

CLASSES = ["pink", "purple"]
COLORS = [(230, 120, 170), (90, 60, 170)]


def write_pattern_slide(path: Path, size: int, mpp: float, seed: int = 0) -> Path:
    """``size`` x ``size`` RGB JPEG pyramid: glass + 7 discs (left half pink, right half purple) + grain."""
    from pbip_engine.engine.outputs.tiff_writer import write_pyramid

    rng = np.random.default_rng(seed)
    discs = [
        (rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size, rng.uniform(0.06, 0.14) * size)
        for _ in range(7)
    ]
    grain = rng.integers(-12, 13, size=(512, 512, 3)).astype(np.int16)
    pink, purple, glass = np.array([225, 140, 185]), np.array([120, 80, 170]), np.array([242, 242, 242])

    def tile(x: int, y: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float32)
        inside = np.zeros((h, w), bool)
        right = np.zeros((h, w), bool)
        for cx, cy, r in discs:
            d = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            inside |= d
            right |= d & (xx > cx)
        rgb = np.broadcast_to(glass, (h, w, 3)).astype(np.int16).copy()
        rgb[inside & ~right] = pink
        rgb[right] = purple
        g = grain[np.arange(y, y + h)[:, None] % 512, np.arange(x, x + w)[None, :] % 512]
        rgb[inside] += 3 * g[inside]
        return np.clip(rgb + g // 4, 0, 255).astype(np.uint8)

    write_pyramid(path, tile, (size, size), mpp, kind="rgb", tile=256, quality=85)
    return path


def tiny_model():
    """A fixed colour -> class CNN (3x3 smoothing + 1x1 colour projection): clean regions like a trained
    segmenter's, so GeoJSON and pyramid sizes are realistic, at ~40 MAC/px of compute."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.smooth = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
            self.smooth.weight.data.fill_(1.0 / 9.0)
            self.head = nn.Conv2d(3, 3, 1)
            # x in [0, 1] RGB (mean 0, std 1): glass (bright) -> 0, pink (R > B) -> 1, purple (B > R) -> 2
            self.head.weight.data = torch.tensor(
                [[1 / 3, 1 / 3, 1 / 3], [2.0, 0.0, -2.0], [-2.0, 0.0, 2.0]]
            ).view(3, 3, 1, 1)
            self.head.bias.data = torch.tensor([-0.72, -0.2, 0.0])
            self.config = {"n_classes": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.smooth(x))

    return Tiny()


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    from pbip_engine.engine.inference.segment_slide import SegmentPredictor, segment_local

    torch.set_num_threads(max(1, args.threads))
    if args.model == "tiny":
        model = tiny_model()
    else:
        from pbip_engine.engine.nn.deeplab import build_segmenter

        model = build_segmenter(args.model, len(CLASSES) + 1, pretrained=False)
    pred = SegmentPredictor(model, device=args.device, amp=True, micro_batch=args.micro_batch)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # interpreter + torch + model
    t0 = time.perf_counter()
    stats = segment_local(
        args.slide, pred, args.out, CLASSES, COLORS,
        model_mpp=args.model_mpp, tile_px=args.tile_px, overlap=args.overlap[0],
        output_mpp=args.output_mpp, batch_size=args.batch_size, canvas_dtype=args.canvas_dtype,
        max_open_mb=args.cache_mb, maxworkers=args.threads,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    stats["wall_s"] = wall
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    stats["base_rss_mb"] = base_rss
    stats["device"] = str(pred.device)
    if pred.device.type == "cuda":
        stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    report(stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=50000, help="slide side in level-0 pixels")
    ap.add_argument("--mpp", type=float, default=0.25, help="slide µm/px (0.25 = 40x)")
    ap.add_argument("--model", default="tiny", choices=["tiny", "deeplabv2", "deeplabv3plus"])
    ap.add_argument("--model-mpp", type=float, default=1.0)
    ap.add_argument("--output-mpp", type=float, default=None, help="default: the model's")
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument(
        "--overlap",
        type=float,
        nargs="+",
        default=[SEGMENT_OVERLAP],
        help="one or more tile overlaps, each run on the same slide; the first is the baseline of the ratios",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--canvas-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--cache-mb", type=float, default=256.0, help="canvas open-chunk budget")
    ap.add_argument("--workdir", default=None, help="keep the slide and outputs here (default: temp dir)")
    ap.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_segment.", dir=args.workdir) as tmp:
        work = Path(args.workdir or tmp)
        slide = work / f"pattern_{args.size}.tif"
        if not slide.exists():
            t = time.perf_counter()
            write_pattern_slide(slide, args.size, args.mpp)
            print(
                f"wrote {slide.name} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s"
            )
        for overlap in args.overlap:
            s = _run_worker(args, slide, work / f"out_{overlap:g}", overlap)
            _report(args, s, overlap)
            runs.append(s)
    if len(runs) > 1:
        base = runs[0]
        print(f"ratios to overlap {args.overlap[0]:.0%}:")
        for overlap, s in zip(args.overlap[1:], runs[1:], strict=True):
            print(
                f"  overlap {overlap:.0%}: tiles {s['n_tiles'] / base['n_tiles']:.2f}x, "
                f"wall {s['wall_s'] / base['wall_s']:.2f}x, inference {s['infer_s'] / base['infer_s']:.2f}x, "
                f"stitching {s['stitch_s'] / max(base['stitch_s'], 1e-9):.2f}x, "
                f"peak RSS {s['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
            )


def _run_worker(args: argparse.Namespace, slide: Path, out: Path, overlap: float) -> dict:
    """Segment ``slide`` in a child process (its peak RSS is the figure) and return its stats."""
    cmd = [sys.executable, __file__, "--worker", "--slide", str(slide), "--out", str(out)]
    cmd += ["--overlap", str(overlap)]
    for k in ("model", "model_mpp", "tile_px", "batch_size", "device", "threads", "canvas_dtype", "cache_mb"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    for k in ("output_mpp", "micro_batch"):
        if getattr(args, k) is not None:
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    s = run_child(cmd)
    s["output_mib"] = {k: Path(p).stat().st_size / 2**20 for k, p in s["paths"].items()}
    return s


def _report(args: argparse.Namespace, s: dict, overlap: float) -> None:
    wall = s["wall_s"]
    print(f"slide {args.size}x{args.size} @ {args.mpp} µm/px, model {args.model} @ {args.model_mpp} µm/px, "
          f"tile {args.tile_px} px, overlap {overlap:.0%}, device {s['device']}, {args.threads} threads")  # fmt: skip
    print(f"  tiles {s['n_tiles']}, tissue {s['tissue_mpix']:.0f} MP (level 0), output {s['shape'][1]}x{s['shape'][0]} "
          f"@ {s['output_mpp']} µm/px, {s['levels']} levels, canvas chunks {s['canvas_chunks']}")  # fmt: skip
    print(
        f"  wall {wall:.1f} s: {s['tissue_mpix'] / wall:.1f} tissue MP/s, {s['n_tiles'] / wall:.1f} tiles/s"
    )
    parts = {k: s[k] for k in ("plan_s", "infer_s", "stitch_s", "mask_write_s", "geojson_s", "overlay_s")}
    print("  time split: " + ", ".join(f"{k[:-2]} {v:.1f} s ({v / wall:.0%})" for k, v in parts.items())
          + f"  [read {s['read_s']:.1f} s in the prefetch thread]")  # fmt: skip
    print(f"  stitching + writing share: {(s['stitch_s'] + s['write_s']) / wall:.0%}")
    print(
        f"  peak RSS {s['peak_rss_mb']:.0f} MB ({s['base_rss_mb']:.0f} MB before the slide: python+torch+model)"
        + (f", peak GPU {s['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in s else "")
    )
    print("  outputs: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in s["output_mib"].items()))
    print("  class areas (mm²): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in s["class_areas_um2"].items()))
    if not math.isfinite(wall):
        raise SystemExit("bad timing")


if __name__ == "__main__":
    main()
