"""The gland paper's Table 2 ablation on a GlaS subset, in one process (no Ray), same protocol for every row.

    python bench/bench_gland_ablation.py --root <glas> [--train 4] [--test 10] [--epochs 1] [--seed 0]
        [--rows base,cca,mpfp,cca+mpfp,cca+mpfp+plf] [--out rows.jsonl]

Per row: the gland classifier (efficientnet_lite0, stride 8, 112-px patches at input 112, MPFP τ 2/4/8)
trained ``--epochs`` on the first ``--train`` GlaS train images' 112-px patches (stride 56) with their
image-level labels -> pseudo masks of those patches (CAM argmax over the patch's labels) scored against
the GlaS masks -> DeepLab-v2 (efficientnet_lite0) trained ``--epochs`` on the pseudo masks with CE or PLF
-> mIoU on the first ``--test`` testA images, whole. Rows that share a classifier (``cca+mpfp`` and
``cca+mpfp+plf``) train it once. It is the pipeline's arithmetic without the pipeline (per-patch pseudo
masks, no stitching, no TTA): a short protocol to compare rows with each other, not with the paper.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pbip_engine.engine.ingest.datasets.glas import GlaSImages, GlaSPatches
from pbip_engine.engine.metrics import SegmentationMeter
from pbip_engine.engine.nn.deeplab import build_segmenter
from pbip_engine.engine.training.loop import LoopConfig, fit_local
from pbip_engine.engine.training.losses import stage2_loss
from pbip_engine.engine.training.segmentation import SegmentationTask, evaluate
from pbip_engine.methods import PseudoOptions, Stage1Inputs, get_method
from pbip_engine.methods.gland.config import GlandConfig

ROWS = {
    "base": ({"cca": False, "mpfp": False}, "ce"),
    "cca": ({"mpfp": False}, "ce"),
    "mpfp": ({"cca": False}, "ce"),
    "cca+mpfp": ({}, "ce"),
    "cca+mpfp+plf": ({}, "plf"),
}


def batches(arrays: dict[str, np.ndarray], size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(next(iter(arrays.values()))))
    for i in range(0, len(order), size):
        yield {k: v[order[i : i + size]] for k, v in arrays.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--train", type=int, default=4)
    ap.add_argument("--test", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="gland_ablation.jsonl")
    ap.add_argument("--work", default="/tmp/gland_ablation")
    a = ap.parse_args()
    torch.set_num_threads(1)

    pats = GlaSPatches(a.root, "train", with_mask=True)
    keep = [i for i, (name, _, _) in enumerate(pats.index) if name in pats.names[: a.train]]
    samples = [pats[i] for i in keep]
    train = {k: np.stack([s[k] for s in samples]) for k in ("image", "labels", "mask")}
    test = GlaSImages(a.root, "testA")
    test_items = [test[i] for i in range(min(a.test, len(test)))]
    print(f"{len(keep)} patches from {a.train} train images, {len(test_items)} testA images", flush=True)
    method, inputs = get_method("gland"), Stage1Inputs(list(pats.class_names))
    cams_by_cfg: dict[str, np.ndarray] = {}
    for row in a.rows.split(","):
        overrides, loss = ROWS[row]
        t0 = time.perf_counter()
        cfg = GlandConfig(input_px=112, mpfp_sizes=[2, 4, 8], **overrides)
        key = json.dumps(overrides, sort_keys=True)
        if key not in cams_by_cfg:
            torch.manual_seed(a.seed)
            task = method.stage1_task(cfg, inputs)
            s1 = f"{a.work}/s{a.seed}_{row}_stage1"
            fit_local(task, lambda e: batches({k: train[k] for k in ("image", "labels")}, 10, a.seed * 100 + e),
                      LoopConfig(epochs=a.epochs, lr=1e-4, amp=False, seed=a.seed), s1, resume=False,
                      log_fn=None)  # fmt: skip
            cam_model = method.load_cam_model(cfg, f"{s1}/last.pt", inputs, "cpu")
            opts = PseudoOptions(background="none")
            cams_by_cfg[key] = np.concatenate([
                cam_model.predict_masks({"image": train["image"][i : i + 32], "labels": train["labels"][i : i + 32]}, opts)
                for i in range(0, len(keep), 32)
            ])  # fmt: skip
        pseudo = cams_by_cfg[key]
        meter = SegmentationMeter(2, ignore_background=False)
        meter.update(pseudo, train["mask"])
        pm = meter.compute()
        t1 = time.perf_counter()
        torch.manual_seed(a.seed)
        seg = build_segmenter(
            "deeplabv2", n_classes=3, backbone="efficientnet_lite0", pretrained=True, crop_px=112
        )
        stask = SegmentationTask(seg, amp=False, loss=stage2_loss(loss))
        fit_local(stask, lambda e, p=pseudo: batches({"image": train["image"], "mask": p}, 16, a.seed * 100 + e),
                  LoopConfig(epochs=a.epochs, lr=1e-3, amp=False, seed=a.seed), f"{a.work}/s{a.seed}_{row}_stage2",
                  resume=False, log_fn=None)  # fmt: skip
        tm = evaluate(
            seg, [{"image": t["image"][None], "mask": t["mask"][None]} for t in test_items], amp=False
        )
        rec = {"row": row, "seed": a.seed, "loss": loss, "pseudo_miou": pm["miou"], "testA_miou": tm["miou"],
               "pseudo_iou": np.round(np.asarray(pm["iou"], float), 4).tolist(), "testA_iou": np.round(np.asarray(tm["iou"], float), 4).tolist(), "stage1_s": round(t1 - t0, 1),
               "stage2_s": round(time.perf_counter() - t1, 1)}  # fmt: skip
        print(json.dumps(rec), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
