"""Stage-2 segmenter cost: a training step and tile inference, dense vs separable head, NCHW vs NHWC.

    python bench/bench_segmenter_step.py                  # DeepLab-v3+ / efficientnet_lite0, 192-px crops
    python bench/bench_segmenter_step.py --crop 256 --batch 4 --device cuda

Why: on the 2-core CPU the GlaS protocol's stage 2 and its testA segmentation were ~40 % of the run, and a
dense DeepLab-v3+ head spends most of a step in its stride-4 decoder. The baseline row is the engine before
``segmenter.separable`` and channels-last (dense head, NCHW weights); every other row prints its ratio to
that baseline, measured in the same process. The steps go through the engine's own ``SegmentationTask``
(prepare, forward, loss, backward, AdamW) and inference through ``SegmentPredictor`` (flip TTA off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from pbip_engine.engine.inference.predict import SegmentPredictor
from pbip_engine.engine.nn.deeplab import build_segmenter
from pbip_engine.engine.training.segmentation import SegmentationTask

VARIANTS = (  # (name, separable head, channels-last)
    ("dense, NCHW (baseline: before)", False, False),
    ("dense, NHWC", False, True),
    ("separable, NCHW", True, False),
    ("separable, NHWC (now)", True, True),
)


def train_rate(separable: bool, nhwc: bool, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", 3, pretrained=False, crop_px=args.crop, separable=separable)
    task = SegmentationTask(model, amp=args.device == "cuda")
    if not nhwc:
        task.model.to(memory_format=torch.contiguous_format)
    task.to(args.device).train()
    opt = torch.optim.AdamW(task.model.parameters(), 1e-4)
    rng = np.random.default_rng(0)
    raw = {"image": rng.integers(0, 255, (args.batch, args.crop, args.crop, 3), dtype=np.uint8),
           "mask": rng.integers(0, 3, (args.batch, args.crop, args.crop), dtype=np.uint8)}  # fmt: skip
    times = []
    for _ in range(args.steps + 1):  # the first step warms up and is dropped
        t = time.perf_counter()
        loss = task(task.prepare(raw, torch.device(args.device)))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return args.batch / statistics.median(times[1:])


def infer_rate(separable: bool, nhwc: bool, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", 3, pretrained=False, crop_px=args.crop, separable=separable)
    pred = SegmentPredictor(model.eval(), device=args.device, channels_last=nhwc)
    tiles = np.random.default_rng(0).integers(0, 255, (16, args.crop, args.crop, 3), dtype=np.uint8)
    pred.predict(tiles)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        pred.predict(tiles)
        times.append(time.perf_counter() - t)
    return len(tiles) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop", type=int, default=192, help="training crop and inference tile, px")
    ap.add_argument("--batch", type=int, default=8, help="training batch (examples/glas.yaml: 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, separable, nhwc in VARIANTS:
        rows.append({"variant": name, "train_img_s": train_rate(separable, nhwc, args),
                     "infer_tiles_s": infer_rate(separable, nhwc, args)})  # fmt: skip
    base = rows[0]
    print(f"DeepLab-v3+ efficientnet_lite0, crop {args.crop} px, train batch {args.batch}, {args.device}")
    print(f"{'variant':34s} {'train img/s':>12s} {'ratio':>6s} {'infer tiles/s':>14s} {'ratio':>6s}")
    for r in rows:
        r["train_ratio"] = r["train_img_s"] / base["train_img_s"]
        r["infer_ratio"] = r["infer_tiles_s"] / base["infer_tiles_s"]
        print(f"{r['variant']:34s} {r['train_img_s']:12.2f} {r['train_ratio']:5.2f}x "
              f"{r['infer_tiles_s']:14.1f} {r['infer_ratio']:5.2f}x")  # fmt: skip
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
