"""End-to-end throughput of the engine's GPU paths, each against its bare forward measured in the same run.

    python bench/gpu_throughput.py --device cuda --out gpu_throughput.json   # H200: > 130 s (see BENCHMARKS)
    python bench/gpu_throughput.py --tiny --device cpu                       # a few tiles: a CPU check

GPU command (one call, both scripts; budget <= 9 min together; first H200 runs: BENCHMARKS.md "One H200")::

    python bench/gpu_glas.py --device cuda --out gpu_glas.json && \\
    python bench/gpu_throughput.py --device cuda --out gpu_throughput.json

(on this project's device machine: ``bash bench/gpu_bundle.sh`` prints the full command, see gpu_glas.py)

Rows (one printed line each: end-to-end rate, bare rate, ratio; every figure also in ``--out``):

* ``embed_<encoder>``: tiles/s through ``engine.embed.embedder.Embedder`` on a TILES batch of JPEG bytes
  (threaded decode, uint8 to the device, normalise there, bf16 forward) vs the encoder's forward alone on
  normalised tensors already on the device. Encoders: efficientnet_lite0 (ImageNet) and a ViT-B/16 built
  with timm (``timm:vit_base_patch16_224``, random weights).
* ``stage1_pbip``: images/s of ``Trainer.train_epoch`` over host uint8 batches (dihedral augmentation,
  copy, normalisation, PbipTask with L_SIM, AdamW, logging) vs the task's forward+backward+step on a batch
  already prepared on the device.
* ``stage2_segmenter``: the same for ``SegmentationTask`` (DeepLab-v3+, efficientnet_lite0).
* ``segment``: tiles/s of plan -> ``iter_tile_pixels`` -> ``SegmentPredictor`` -> ``fill_canvas`` (Gaussian
  blending into the on-disk ``Canvas``) over a synthetic image slide vs the segmenter's bare forward on the
  same number of device tiles.

It prints one line per row and a total, e.g. from the ``--tiny`` CPU run (loaded 2-core host, noise)::

    embed_efficientnet_lite0: 0.7 tiles/s end to end vs 0.8 tiles/s bare forward = 0.86
    embed_timm_vit_base_patch16_224: 3.2 tiles/s end to end vs 5.8 tiles/s bare forward = 0.56
    stage1_pbip: 1.8 images/s end to end vs 1.5 images/s bare forward = 1.24
    stage2_segmenter: 1.3 images/s end to end vs 0.3 images/s bare forward = 4.56
    segment: 1.5 tiles/s end to end vs 1.6 tiles/s bare forward = 0.93
    total: 122.7 s on x86_64

A ratio near 1 means the engine adds little to the model; well below 1 names the part to fix. CI never
depends on this script: ``tests/test_gpu_bench.py`` (marked slow) only runs ``--tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from gpu_common import NullStore, apply_tiny, device_record, finish, setup_device, sync

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.embedder import Embedder
from pbip_engine.engine.inference.fill import fill_canvas
from pbip_engine.engine.inference.plan import open_any, plan
from pbip_engine.engine.inference.predict import SegmentPredictor, iter_tile_pixels
from pbip_engine.engine.inference.stitch import Canvas
from pbip_engine.engine.nn.deeplab import build_segmenter
from pbip_engine.engine.training.amp import autocast
from pbip_engine.engine.training.loop import LoopConfig, Trainer
from pbip_engine.engine.training.segmentation import SegmentationTask
from pbip_engine.methods.pbip.classnet import ClassNetConfig, build_classnet
from pbip_engine.methods.pbip.task import PbipTask


def timed(fn: Callable[[], Any], dev: torch.device) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def texture(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 RGB ``size`` x ``size`` images of smoothed H&E-coloured noise (JPEG-realistic content)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        small = rng.uniform(0, 1, (max(2, size // 16), max(2, size // 16), 1)).astype(np.float32)
        blob = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
        pink, purple = np.array([230, 140, 190]), np.array([110, 70, 160])
        rgb = blob * purple + (1 - blob) * pink + rng.normal(0, 12, (size, size, 3))
        out[i] = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def row(res: dict, name: str, unit: str, e2e: float, bare: float, extra: dict | None = None) -> None:
    ratio = e2e / bare if bare > 0 else float("nan")
    res["rows"][name] = {"unit": unit, "end_to_end": e2e, "bare": bare, "ratio": ratio, **(extra or {})}
    print(f"{name}: {e2e:.1f} {unit} end to end vs {bare:.1f} {unit} bare forward = {ratio:.2f}", flush=True)


# ------------------------------------------------------------------------------------------ embedding


def bench_embed(res: dict, name: str, kw: dict, args, dev: torch.device) -> None:
    emb = Embedder(name, None, device=str(dev), dtype="float16", amp=True, batch_size=args.embed_batch,
                   encoder_kwargs=kw or None)  # fmt: skip
    size = emb.info.input_size
    uniq = texture(min(64, args.embed_tiles), size, seed=1)
    jpegs = [cv2.imencode(".jpg", im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in uniq]
    n = args.embed_tiles
    batch = {
        "tile_id": np.array([f"t{i}" for i in range(n)], dtype=object),
        "slide_id": np.array(["s"] * n, dtype=object),
        "x": np.zeros(n, np.int64),
        "y": np.zeros(n, np.int64),
        "white_fraction": np.zeros(n, np.float32),
        "labelled": np.zeros(n, bool),
        "labels": np.zeros((n, 2), np.uint8),
        "image": np.array([jpegs[i % len(jpegs)] for i in range(n)], dtype=object),
    }
    chunk = max(args.embed_batch, min(n, 1024))

    def e2e() -> None:
        for i in range(0, n, chunk):
            emb({k: v[i : i + chunk] for k, v in batch.items()})

    emb({k: v[: args.embed_batch] for k, v in batch.items()})  # warm-up (cudnn, threads)
    t_e2e = timed(e2e, dev)

    model = emb.model
    x = emb.model.preprocess(uniq[: args.embed_batch], device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    steps = max(1, n // args.embed_batch)

    def bare() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"),
        ):
            for _ in range(steps):
                model(x)

    with torch.inference_mode():
        model(x)
    t_bare = timed(bare, dev)
    emb.close()
    row(res, f"embed_{name.replace(':', '_')}", "tiles/s", n / t_e2e, steps * args.embed_batch / t_bare,
        {"tiles": n, "batch": args.embed_batch, "input_px": size})  # fmt: skip


# ------------------------------------------------------------------------------------------- training


def bench_train(res: dict, name: str, task, px: int, batch: int, steps: int, make_batch, dev) -> None:
    """``Trainer.train_epoch`` over host uint8 batches vs forward+backward+step on a prepared device batch."""
    loop = LoopConfig(epochs=1, lr=1e-4, schedule="poly", amp=True, augment=True)
    trainer = Trainer(task, loop, NullStore(), device=dev, log_fn=None)
    host = [make_batch(i) for i in range(steps)]
    trainer.train_epoch(host[:1], 0, 0, steps + 1)  # warm-up
    t_loop = timed(lambda: trainer.train_epoch(host, 1, 1, steps + 1), dev)

    ready = task.prepare(host[0], dev)
    opt = trainer.optimizer

    def step() -> None:
        with autocast(dev, True):
            loss = task(ready)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t_bare = timed(lambda: [step() for _ in range(steps)], dev)
    n = steps * batch
    row(res, name, "images/s", n / t_loop, n / t_bare, {"batch": batch, "input_px": px, "steps": steps})


def bench_stage1(res: dict, args, dev: torch.device) -> None:
    from pbip_engine.engine.embed.encoders import create_encoder

    enc = create_encoder("efficientnet_lite0")
    cfg = ClassNetConfig(sim_size=args.sim_size, amp=True)
    protos = torch.nn.functional.normalize(torch.randn(6, enc.info.dim), dim=1)
    task = PbipTask(build_classnet(cfg, protos, [3, 3], 2), cfg, enc)
    imgs = texture(8, args.cls_px, seed=2)
    rng = np.random.default_rng(0)

    def make(i: int) -> dict[str, np.ndarray]:
        idx = rng.integers(0, len(imgs), args.cls_batch)
        labels = np.zeros((args.cls_batch, 2), np.float32)
        labels[:, 0] = 1
        labels[::2, 1] = 1  # half the images carry both classes, like GlaS patches
        return {"image": imgs[idx], "labels": labels}

    bench_train(res, "stage1_pbip", task, args.cls_px, args.cls_batch, args.train_steps, make, dev)


def bench_stage2(res: dict, args, dev: torch.device) -> None:
    task = SegmentationTask(build_segmenter("deeplabv3plus", 3, pretrained=False), amp=True)
    imgs = texture(8, args.seg_px, seed=3)
    rng = np.random.default_rng(0)

    def make(i: int) -> dict[str, np.ndarray]:
        idx = rng.integers(0, len(imgs), args.seg_batch)
        mask = (imgs[idx, :, :, 2] > 170).astype(np.uint8) + 1
        return {"image": imgs[idx], "mask": mask}

    bench_train(res, "stage2_segmenter", task, args.seg_px, args.seg_batch, args.train_steps, make, dev)


# -------------------------------------------------------------------------------------------- segment


def bench_segment(res: dict, args, dev: torch.device, work: Path) -> None:
    slide = work / "slide.png"
    img = texture(1, args.slide_px, seed=4)[0]
    cv2.imwrite(str(slide), img[:, :, ::-1])
    model = build_segmenter("deeplabv3plus", 3, pretrained=False)
    pred = SegmentPredictor(model, device=str(dev), amp=True)
    mpp = 0.5
    tile = args.tile_px

    def e2e() -> int:
        p = plan(slide, mpp, tile, 0.25, mpp_override=mpp, use_tissue=False)
        with open_any(slide, mpp) as s, Canvas(work / "canvas", (args.slide_px, args.slide_px), 3) as canvas:
            pix = iter_tile_pixels(s, p.tiles, tile)

            def batches():
                for i in range(0, len(p.tiles), args.seg_tiles_batch):
                    chunk = p.tiles[i : i + args.seg_tiles_batch]
                    images = np.stack([next(pix)[1] for _ in chunk])
                    yield pred({"image": images, "x": np.array([t.x for t in chunk]),
                                "y": np.array([t.y for t in chunk]), "size0": np.array([t.size0 for t in chunk])})  # fmt: skip

            stats = fill_canvas(canvas, batches(), 1.0, slide, ["a", "b"])
            for _ in canvas.iter_bands():
                pass
        return stats.n_tiles

    pred.predict(img[None, :tile, :tile])  # warm-up
    t = time.perf_counter()
    n_tiles = e2e()
    t_e2e = time.perf_counter() - t

    x = torch.randn(args.seg_tiles_batch, 3, tile, tile, device=dev)
    m = pred.model
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    steps = max(1, -(-n_tiles // args.seg_tiles_batch))

    def bare() -> None:
        with torch.inference_mode(), autocast(dev, True):
            for _ in range(steps):
                m(x)

    t_bare = timed(bare, dev)
    row(res, "segment", "tiles/s", n_tiles / t_e2e, steps * args.seg_tiles_batch / t_bare,
        {"tiles": n_tiles, "tile_px": tile, "slide_px": args.slide_px, "overlap": 0.25})  # fmt: skip


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a few tiles and steps, small inputs (CPU check)")
    ap.add_argument("--embed-tiles", type=int, default=8192)
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--vit", default="timm:vit_base_patch16_224")
    ap.add_argument("--vit-px", type=int, default=None, help="ViT img_size (default its 224)")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--cls-px", type=int, default=224)
    ap.add_argument("--cls-batch", type=int, default=64)
    ap.add_argument("--sim-size", type=int, default=None)
    ap.add_argument("--seg-px", type=int, default=256)
    ap.add_argument("--seg-batch", type=int, default=16)
    ap.add_argument("--slide-px", type=int, default=6144)
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--seg-tiles-batch", type=int, default=32)
    args = ap.parse_args(argv)
    if args.tiny:
        tiny = {"embed_tiles": 16, "embed_batch": 8, "vit_px": 64, "train_steps": 2, "cls_px": 64,
                "cls_batch": 4, "sim_size": 64, "seg_px": 64, "seg_batch": 2, "slide_px": 320, "tile_px": 128,
                "seg_tiles_batch": 4}  # fmt: skip
        apply_tiny(ap, args, tiny)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dev = setup_device(args.device)
    torch.manual_seed(0)
    res: dict[str, Any] = {**device_record(dev, args), "rows": {}}
    t0 = time.perf_counter()
    vit_kw: dict[str, Any] = {"random_init": True}
    if args.vit_px:
        vit_kw["img_size"] = args.vit_px
    # the row the first H200 call never reached (its guard stopped the script) runs first now
    with tempfile.TemporaryDirectory(prefix="gpu_throughput.") as tmp:
        bench_segment(res, args, dev, Path(tmp))
    bench_stage2(res, args, dev)
    bench_stage1(res, args, dev)
    bench_embed(res, "efficientnet_lite0", {}, args, dev)
    bench_embed(res, args.vit, vit_kw, args, dev)
    res["total_s"] = round(time.perf_counter() - t0, 2)
    print(f"total: {res['total_s']:.1f} s on {res['device_name']}", flush=True)
    return finish(res, args.out, dev)


if __name__ == "__main__":
    main()
