"""Per-iteration time of each MPAMatch variant: one batch of 16 tiles (8 labelled + 8 unlabelled; the
supervised variant: 16 labelled), random data, the real packaged text encoder.

  python bench/bench_mpamatch_time.py [tile_px=96] [threads=1]
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch

VARIANTS = {
    "supervised": {"consistency": False, "image_prototypes": False, "text_prototypes": False},
    "unimatch": {"image_prototypes": False, "text_prototypes": False},
    "unimatch+img": {"text_prototypes": False},
    "mpamatch": {},
}


def main() -> None:
    from pbip_engine.engine.training.loop import LocalStore, LoopConfig, Trainer
    from pbip_engine.methods.mpamatch.config import MpaMatchConfig
    from pbip_engine.methods.mpamatch.method import build_task

    px = int(sys.argv[1]) if len(sys.argv) > 1 else 96
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    rng = np.random.default_rng(0)
    for name, kw in VARIANTS.items():
        cfg = MpaMatchConfig(**kw)
        task = build_task(cfg, ["tumour", "stroma", "lymphocytes", "necrosis"])
        trainer = Trainer(task, LoopConfig(lr=1e-3, amp=False), LocalStore(tempfile.mkdtemp()))
        batches = []
        for _ in range(4):
            lab = np.array([True] * 8 + [False] * 8) if cfg.semi else np.ones(16, bool)
            batches.append({"image": rng.integers(0, 255, (16, px, px, 3), dtype=np.uint8),
                            "mask": rng.integers(0, 5, (16, px, px)).astype(np.uint8), "labelled": lab})  # fmt: skip
        trainer.train_epoch(batches[:1], 1, 0, None)  # warm-up
        t0 = time.perf_counter()
        trainer.train_epoch(batches[1:], 1, 0, None)
        print(f"{name:14s} {(time.perf_counter() - t0) / 3:.3f} s/iter ({px} px)", flush=True)


if __name__ == "__main__":
    main()
