"""Gland classifier step time and peak memory with and without CCA, at several input sizes (issue 17).

    python bench/bench_gland_cca.py [--px 112 224 448] [--batch 2] [--steps 3] [--threads 1]

Step cost is the median CPU time of one thread (``process_time``), which a shared machine does not
inflate the way it inflates wall time (printed too). Each (size, CCA on/off) runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. A step
is forward + BCE + backward + SGD update of the whole classifier (efficientnet_lite0, output stride 8, MPFP
on, CCA after feature levels 2-4 when on). CCA's criss-cross energies grow as (h+w)·hw and its position
attention as (hw)², with h = w = px / 8 here: the printed ratios show where the quadratic term starts to
dominate.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(px: int, cca: bool, batch: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pbip_engine.methods.gland.model import GlandNet, GlandNetConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sizes = [s for s in (2, 4, 8, 16) if s <= px // 8]
    model = GlandNet(GlandNetConfig(n_classes=2, pretrained=False, input_px=px, cca=cca, mpfp_sizes=sizes))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, px, px), torch.randint(0, 2, (batch, 2)).float()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.binary_cross_entropy_with_logits(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hw = (px // 8) ** 2
    return {"px": px, "cca": cca, "batch": batch, "step_s": sorted(times)[len(times) // 2],
            "step_cpu_s": sorted(cpu)[len(cpu) // 2],
            "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - base) / 1024,
            "cc_energies": (2 * (px // 8)) * hw, "pam_energies": hw * hw}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, nargs="+", default=[112, 224, 448])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("PX", "CCA"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(int(a.one[0]), a.one[1] == "1", a.batch, a.steps, a.threads)))
        return
    print(
        "| px | CAM h×w | step CPU s without CCA | with CCA | ratio | (wall s without / with) | peak RSS MB without | with | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for px in a.px:
        res = {}
        for cca in (False, True):
            cmd = [sys.executable, __file__, "--one", str(px), str(int(cca)), "--batch", str(a.batch),
                   "--steps", str(a.steps), "--threads", str(a.threads)]  # fmt: skip
            res[cca] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        off, on = res[False], res[True]
        print(f"| {px} | {px // 8}×{px // 8} | {off['step_cpu_s']:.3f} | {on['step_cpu_s']:.3f} | "
              f"{on['step_cpu_s'] / off['step_cpu_s']:.2f} | {off['step_s']:.2f} / {on['step_s']:.2f} | "
              f"{off['peak_rss_mb']:.0f} | {on['peak_rss_mb']:.0f} | "
              f"{on['peak_rss_mb'] / off['peak_rss_mb']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
