"""LPD's stage-1 training step vs PBIP's on the same batch (forward, backward, AdamW step).

Same backbone (efficientnet_lite0), the same frozen crop encoder and the same batch (default 10 images at
224 px, 4 classes, each image labelled with 1 or 2 classes). PBIP: 4 x K=3 fixed bank prototypes, L_CLS +
L_SIM. LPD: 4 x k learnable prototypes (k = 3 and 10), after the warm-up, so L_CLS + InfoNCE + L_div.

    OMP_NUM_THREADS=1 python bench/bench_lpd_step.py [--device cpu|cuda] [--size 224] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from bench_classnet import _time

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.encoders.efficientnet import build_efficientnet_lite0
from pbip_engine.engine.training.amp import autocast
from pbip_engine.engine.training.loop import LoopConfig, make_optimizer
from pbip_engine.methods.lpd.model import LpdNetConfig, build_lpdnet, initial_prototypes
from pbip_engine.methods.lpd.task import LpdTask
from pbip_engine.methods.pbip.classnet import ClassNetConfig, build_classnet, freeze_encoder
from pbip_engine.methods.pbip.task import PbipTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument(
        "--sim-size", type=int, default=None, help="FG/BG crop edge for the encoder (default 224)"
    )
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    amp = dev.type == "cuda"
    n = args.classes
    encoder = freeze_encoder(build_efficientnet_lite0().to(dev))

    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    labels = torch.zeros(args.batch, n, device=dev)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        labels[i, torch.randperm(n, generator=g)[: 1 + i % 2]] = 1
    batch = {"image": x, "labels": labels}

    tasks = {}
    pcfg = ClassNetConfig(pretrained=False, sim_size=args.sim_size, amp=amp)
    protos = F.normalize(torch.randn(n * 3, encoder.info.dim), dim=1)
    tasks["PBIP K=3"] = PbipTask(build_classnet(pcfg, protos, [3] * n, n), pcfg, encoder)
    for k in (3, 10):
        lcfg = LpdNetConfig(pretrained=False, sim_size=args.sim_size, amp=amp, k=k, enc_dim=encoder.info.dim,
                            warmup_iters=0)  # fmt: skip
        net = build_lpdnet(lcfg, n, initial_prototypes(n, k, lcfg.proto_dim))
        tasks[f"LPD k={k}"] = LpdTask(net, lcfg, encoder)
    stats: dict[str, dict[str, float]] = {}

    def step_fn(name: str, task):
        task.to(dev).train()
        opt = make_optimizer(task, LoopConfig(lr=1e-5, weight_decay=1e-3))

        def step() -> None:
            with autocast(dev, amp):
                out = task(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            stats[name] = {k: v for k, v in out.items() if k != "loss"}

        return step

    fns = {name: step_fn(name, t) for name, t in tasks.items()}
    for fn in fns.values():
        _time(fn, args.warmup, 0)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(args.iters):  # interleaved, so load from other processes hits every row alike
        for k, fn in fns.items():
            times[k] += _time(fn, 0, 1)
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch} size={args.size} classes={n}")
    print("                 wall ms   img/s |  CPU ms | vs PBIP (CPU) | FG/BG crops")
    for k in fns:
        crops = int(stats[k].get("n_sim", 0))
        print(f"{k:14s} {wall[k] * 1000:9.1f} {args.batch / wall[k]:7.2f} | {cpu[k] * 1000:7.1f} | "
              f"{cpu[k] / cpu['PBIP K=3']:12.2f}x | {crops}")  # fmt: skip


if __name__ == "__main__":
    main()
