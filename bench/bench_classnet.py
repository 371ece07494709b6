"""ClassNet training throughput (with L_SIM) vs the plain backbone's forward+backward on the same batch.

Both sides do forward, backward and an AdamW step on one fixed in-memory batch (default: 10 images at
224 px, efficientnet_lite0 backbone + efficientnet_lite0 ImageNet bank encoder, 4 classes x K=3 random
prototypes, each image labelled with 1 or 2 classes, so L_SIM encodes 2 x 1.5 x 10 FG/BG images per step).

    python bench/bench_classnet.py [--device cpu|cuda] [--batch 10] [--size 224] [--sim-size 112]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.encoders.efficientnet import build_efficientnet_lite0
from pbip_engine.engine.training.amp import autocast
from pbip_engine.engine.training.loop import LoopConfig, make_optimizer
from pbip_engine.methods.pbip.classnet import ClassNetConfig, build_classnet, classnet_step, freeze_encoder
from pbip_engine.methods.pbip.task import PbipTask


def _time(fn, warmup: int, iters: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds per call; CPU time is robust to other processes on a shared host."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t, time.process_time() - c))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument(
        "--sim-size", type=int, default=None, help="FG/BG edge for the bank encoder (default 224)"
    )
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)

    cfg = ClassNetConfig(
        backbone=args.backbone, pretrained=args.backbone == "efficientnet_lite0", sim_size=args.sim_size
    )
    cfg.amp = dev.type == "cuda"
    encoder = freeze_encoder(build_efficientnet_lite0().to(dev))
    protos = F.normalize(torch.randn(args.classes * args.k, encoder.info.dim), dim=1)
    model = build_classnet(cfg, protos, [args.k] * args.classes, args.classes).to(dev).train()
    opt = make_optimizer(PbipTask(model, cfg), LoopConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))

    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    labels = torch.zeros(args.batch, args.classes, device=dev)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        n = 1 + i % 2
        labels[i, torch.randperm(args.classes, generator=g)[:n]] = 1
    batch = {"image": x, "labels": labels}
    stats: dict[str, float] = {}

    def classnet_train_step() -> None:
        with autocast(dev, cfg.amp):
            loss, s = classnet_step(model, encoder, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats.update(s)

    plain = model.backbone  # the very same backbone module and weights, without ClassNet's head and losses
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)

    def backbone_step() -> None:
        with autocast(dev, cfg.amp):
            feats = plain(x)
            loss = sum(f.float().square().mean() for f in feats)  # dense gradient, like a real loss
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    cfg_nosim = ClassNetConfig(**{**cfg.to_dict(), "use_sim": False})

    def classnet_nosim_step() -> None:
        with autocast(dev, cfg.amp):
            loss, _ = classnet_step(model, encoder, batch, cfg_nosim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # interleaved, so load from other processes on a shared host hits all three alike
    fns = {"plain": backbone_step, "nosim": classnet_nosim_step, "cls": classnet_train_step}
    for fn in fns.values():
        _time(fn, args.warmup, 0)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(args.iters):
        for k, fn in fns.items():
            times[k] += _time(fn, 0, 1)
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    b = args.batch
    print(
        f"device={dev} threads={torch.get_num_threads()} batch={b} size={args.size} backbone={args.backbone}"
    )
    print(
        f"FG/BG samples per step: {int(stats['n_sim'])} "
        f"(x2 images through the bank encoder at {args.sim_size or encoder.info.input_size} px)"
    )
    print("                         wall ms   img/s |  CPU ms (process time)")
    rows = (
        ("backbone fwd+bwd+step", "plain"),
        ("ClassNet L_CLS only", "nosim"),
        ("ClassNet L_CLS+L_SIM", "cls"),
    )
    for label, k in rows:
        print(f"{label:22s} {wall[k] * 1000:9.1f} {b / wall[k]:7.2f} | {cpu[k] * 1000:9.1f}")
    print(
        f"ratio ClassNet(L_SIM)/backbone step: wall {wall['cls'] / wall['plain']:.2f}x, "
        f"CPU {cpu['cls'] / cpu['plain']:.2f}x (target <= 2x)"
    )


if __name__ == "__main__":
    main()
