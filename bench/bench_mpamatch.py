"""MPAMatch ablation ladder on a short CPU protocol (Ray-free, the method's own task and loop).

One row = one (data, labelled fraction, variant, seed): ``--iters`` steps of ``--batch`` tiles (half
labelled random crops with their masks, half unlabelled crops; supervised-only sees the labelled half only),
then mIoU/mDice of the argmax on held-out images. Variants: ``sup`` (supervised only), ``unimatch``
(+ weak-to-strong consistency and FP), ``img`` (+ image prototypes), ``full`` (+ text prototypes = MPAMatch),
``ceiling`` (supervised on every train image). Prints one JSON line per row (append to a file).

  python bench/bench_mpamatch.py --data glas --root <glas> --fraction 0.125 --variant full --seed 0
  python bench/bench_mpamatch.py --data demo --root <run dir of a finished demo> --variant sup
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "sup": dict(consistency=False, image_prototypes=False, text_prototypes=False),
    "unimatch": dict(image_prototypes=False, text_prototypes=False),
    "img": dict(text_prototypes=False),
    "full": {},
    "ceiling": dict(consistency=False, image_prototypes=False, text_prototypes=False),
}


def glas_data(root: Path, n_test: int):
    from pbip_engine.engine.ingest.datasets.glas import GlaSImages

    train, test = GlaSImages(root, "train"), GlaSImages(root, "testA")
    images = {n: (train.image(n), train.mask(n)) for n in train.names}
    tests = [(test.image(n), test.mask(n)) for n in sorted(test.names)[:n_test]]
    return images, tests, ["gland", "non_gland"]


def demo_data(run: Path, n_test: int, seed: int):
    """Tiles of a finished demo run; held-out = tiles of the unlabelled slides with their synthetic truth."""
    import pyarrow.dataset as pads

    from pbip_engine.engine.ingest.datasets.common import decode_rgb
    from pbip_engine.engine.pseudo.scoring import open_truth, truth_region

    t = (
        pads.dataset(str(run / "tile" / "tiles"), format="parquet")
        .to_table(columns=["slide_id", "x", "y", "size0", "tile_px", "image"])
        .to_pylist()
    )
    truths = {s: open_truth(run / "synth" / "truth" / f"{s}.mask.tif") for s in {r["slide_id"] for r in t}}
    per: dict[str, list] = {}
    for r in t:
        m = truth_region(truths[r["slide_id"]], r["x"], r["y"], r["size0"], r["tile_px"])
        per.setdefault(r["slide_id"], []).append((decode_rgb(r["image"]), m))
    classes = json.loads((run / "segmenter" / "model.json").read_text())["class_names"]
    return per, classes


def crops(pool, n, size, rng, labelled):
    imgs, masks = [], []
    for _ in range(n):
        img, m = pool[int(rng.integers(len(pool)))]
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        imgs.append(img[y : y + size, x : x + size])
        masks.append(m[y : y + size, x : x + size] if labelled else np.full((size, size), 255, np.uint8))
    return imgs, masks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["glas", "demo"], required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--variant", choices=list(VARIANTS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    from pbip_engine.engine.training.loop import LocalStore, LoopConfig, Trainer
    from pbip_engine.engine.training.segmentation import evaluate
    from pbip_engine.methods.mpamatch.config import MpaMatchConfig
    from pbip_engine.methods.mpamatch.labels import choose_labelled
    from pbip_engine.methods.mpamatch.method import build_task

    root = Path(a.root)
    if a.data == "glas":
        images, tests, classes = glas_data(root, a.n_test)
        ids = sorted(images)
        pools = {i: [images[i]] for i in ids}
    else:
        pools, classes = demo_data(root, a.n_test, a.seed)
        ids = sorted(pools)
    cfg = MpaMatchConfig(
        labelled_fraction=1.0 if a.variant == "ceiling" else a.fraction, **VARIANTS[a.variant]
    )

    def classes_of(i: str) -> set[int]:  # as the pipeline's split reads the masks (cover_classes)
        return {int(v) for _, m in pools[i] for v in np.unique(m)}

    labelled = choose_labelled(ids, dict.fromkeys(ids, Path("x")), cfg, a.seed, classes_of)
    unlabelled = [i for i in ids if i not in labelled]
    lab_pool = [p for i in labelled for p in pools[i]]
    unl_pool = [p for i in unlabelled for p in pools[i]]
    if a.data == "demo":  # held out: tiles of the unlabelled slides (every 4th, at most n_test * 10)
        tests = unl_pool[::4][: a.n_test * 10]
    task = build_task(cfg, classes, amp=False)
    import tempfile

    trainer = Trainer(task, LoopConfig(lr=a.lr, amp=False, schedule="poly", seed=a.seed),
                      LocalStore(tempfile.mkdtemp()), log_fn=None)  # fmt: skip
    half = a.batch // 2
    crop = a.crop if a.data == "glas" else lab_pool[0][0].shape[0]

    def batches():
        for _ in range(a.iters):
            im, m = crops(lab_pool, half, crop, rng, True)
            lab = [True] * half
            if cfg.semi:
                ui, um = crops(unl_pool, half, crop, rng, False)
                im, m, lab = im + ui, m + um, lab + [False] * half
            yield {"image": np.stack(im), "mask": np.stack(m), "labelled": np.array(lab)}

    t0 = time.perf_counter()
    stats = trainer.train_epoch(batches(), 1, 0, a.iters)
    train_s = time.perf_counter() - t0

    def eval_batches():
        for img, m in tests:
            h, w = m.shape
            ph, pw = -h % 32, -w % 32
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
            m = np.pad(m, ((0, ph), (0, pw)), constant_values=255)
            yield {"image": img[None], "mask": m[None]}

    res = evaluate(task.model, eval_batches(), amp=False)
    row = {"data": a.data, "fraction": None if a.variant == "ceiling" else a.fraction, "n_labelled": len(labelled),
           "variant": a.variant, "seed": a.seed, "iters": a.iters, "batch": a.batch, "crop": crop,
           "n_test": len(tests), "miou": round(res["miou"], 4), "mdice": round(res["mdice"], 4),
           "s_per_iter": round(train_s / a.iters, 3), "loss": round(stats["loss"], 4),
           "mask_ratio": round(stats.get("mask_ratio", float("nan")), 3)}  # fmt: skip
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
