"""Bank build time on N random embeddings over C classes (default: 100k x 512-d, 4 classes, K=3, N_K=100).

    python bench/bench_bank.py [--n 100000] [--dim 512] [--classes 4] [--k 3] [--n-k 100] [--multi 0.3]

Random (structureless) features are the slow case for K-means: no clusters to converge onto quickly.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pbip_engine.engine.prototypes.bank import BankParams, build_bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--n-k", type=int, default=100)
    ap.add_argument("--multi", type=float, default=0.3, help="fraction of multi-label tiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-max", type=int, default=BankParams.fit_max)
    a = ap.parse_args()

    rng = np.random.default_rng(a.seed)
    cls = rng.integers(0, a.classes, a.n)
    labels = np.eye(a.classes, dtype=np.uint8)[cls]
    multi = rng.random(a.n) < a.multi
    labels[multi, (cls[multi] + 1) % a.classes] = 1
    data = {
        "tile_id": np.array([f"t{i}" for i in range(a.n)], dtype=object),
        "embedding": rng.normal(size=(a.n, a.dim)).astype(np.float16),
        "labels": labels,
        "labelled": np.ones(a.n, bool),
        "white_fraction": rng.uniform(0, 0.7, a.n).astype(np.float32),
    }
    names = [f"class{c}" for c in range(a.classes)]
    t0 = time.perf_counter()
    bank, rep = build_bank(
        data, names, "bench@random", BankParams(k=a.k, n_k=a.n_k, fit_max=a.fit_max), log=lambda m: None
    )
    dt = time.perf_counter() - t0
    used = sum(c["used"] for c in rep["classes"].values())
    print(
        json.dumps(
            {
                "n": a.n,
                "dim": a.dim,
                "classes": a.classes,
                "k": a.k,
                "n_k": a.n_k,
                "fit_max": a.fit_max,
                "clustered_tiles": used,
                "held_out": rep["holdout_size"],
                "prototypes": list(bank.prototypes.shape),
                "build_s": round(dt, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
