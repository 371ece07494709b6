"""CPU that Ray Data's scheduling loop burns while a slow consumer holds it back, with and without the patch.

    python bench/bench_ray_idle.py [--rows 4000] [--batch 10] [--step-ms 40] [--repeats 1]
    python bench/bench_ray_idle.py --spec RUN.yaml      # the real thing: a finished run's classnet, redone twice
    python bench/bench_ray_idle.py --spec RUN.yaml --cache   # streamed every epoch vs held in memory after epoch 1

The shape of a ClassNet epoch: a Parquet dataset of JPEG-sized rows in many small files,
``streaming_split(1)`` (what Ray Train does), consumed by one actor that reserves ``--consumer-cpus`` of
the session's 2 CPUs (what a Train worker reserves) and spends ``--step-ms`` per batch (the training
step). With the read tasks held back by the CPU budget, no task runs and Ray's loop never waits. Two
fresh local Ray sessions run it, ``PBIP_RAY_IDLE_BACKOFF=0`` (Ray as shipped) then ``=1`` (the
engine's ``ray_runtime.patch_idle_spin``: each loop step lasts at least 10 ms). Figures per run: the ``SplitCoordinator`` actor's CPU
seconds (user + system, from ``/proc`` through psutil) per second of the epoch, and the consumer's
wall time against the ideal ``batches x step`` (so a patch that starved the consumer would show).
CPU seconds, not wall time, are the robust figure on a shared machine.

The toy does not always reach the state that spins (on this machine it did not: Ray Data's budget let a
read task run). ``--spec`` measures the real case: ``pbip-engine run SPEC --stages classnet --force
classnet`` as a user runs it, once per setting, the coordinator's CPU seconds sampled from ``/proc``
until the driver exits, and the stage's seconds from ``run.json``. ``--spec ... --cache`` redoes the stage
with ``resources.train_cache_mb: 0`` (every epoch streamed through Ray Data) and then with the spec's own
value (epochs 2+ from the worker's memory, ``engine/training/epoch_cache.py``), and prints each epoch's
images/s and the ratio of the two runs' epochs 2+ (give the spec ``stage1.epochs`` >= 2).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _write(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 6000, dtype=np.uint8).tobytes() for _ in range(rows)]  # ~ a 112-px JPEG
    for i in range(0, rows, 114):  # one file per image, as GlaS's 85 train images give ~114 patches each
        pq.write_table(pa.table({"i": list(range(i, min(rows, i + 114))), "image": blobs[i : i + 114]}),
                       path / f"part-{i:06d}.parquet")  # fmt: skip


def _coordinators() -> set[int]:
    import psutil

    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("SplitCoordinator" in c for c in p.info["cmdline"] or ()):
                pids.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _coordinator_cpu(exclude: set[int]) -> float:
    """CPU seconds of this session's SplitCoordinator (other Ray sessions on the host have their own)."""
    import psutil

    total = 0.0
    for pid in _coordinators() - exclude:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def run_once(data: Path, batch: int, step_s: float, backoff: bool, consumer_cpus: float) -> dict[str, float]:
    os.environ["PBIP_RAY_IDLE_BACKOFF"] = "1" if backoff else "0"  # the raylet and its workers inherit it
    import ray

    from pbip_engine.jobs.ray_runtime import ensure_ray, shutdown_ray
    from pbip_engine.jobs.resources import read_options
    from pbip_engine.schemas.spec import ResourcesSection

    ensure_ray(None, ResourcesSection(local_cpus=2))
    others = _coordinators()
    try:

        @ray.remote(num_cpus=consumer_cpus)
        class Consumer:
            def consume(self, it, batch: int, step_s: float) -> tuple[int, float]:
                t0, n = time.perf_counter(), 0
                for b in it.iter_batches(batch_size=batch, batch_format="numpy"):
                    n += len(b["i"])
                    time.sleep(step_s)  # the training step
                return n, time.perf_counter() - t0

        from ray.data import DataContext
        from ray.data._internal.execution.interfaces import ExecutionResources

        # What Ray Train tells Ray Data: the workers' CPUs are not Data's to use.
        DataContext.get_current().execution_options.exclude_resources = ExecutionResources(cpu=consumer_cpus)
        ds = ray.data.read_parquet(str(data), **read_options())
        (it,) = ds.streaming_split(1, equal=True)
        consumer = Consumer.remote()
        ref = consumer.consume.remote(it, batch, step_s)
        before = None
        while before is None or before == 0.0:  # the coordinator starts with the first batch request
            time.sleep(0.2)
            before = _coordinator_cpu(others)
        t0 = time.perf_counter()
        n, wall = ray.get(ref)
        cpu = _coordinator_cpu(others) - before
        span = time.perf_counter() - t0
    finally:
        shutdown_ray()
    batches = -(-n // batch)
    return {"rows": n, "consumer_s": wall, "ideal_s": batches * step_s, "coord_cpu_per_s": cpu / span}


def run_stage(spec: Path, backoff: bool, cache_mb: float | None = None) -> dict[str, float]:
    import json
    import subprocess
    import sys

    import psutil
    import yaml

    env = dict(os.environ, PBIP_RAY_IDLE_BACKOFF="1" if backoff else "0")
    if cache_mb is not None:  # the same spec with resources.train_cache_mb set, beside the original
        doc = yaml.safe_load(spec.read_text())
        doc.setdefault("resources", {})["train_cache_mb"] = cache_mb
        spec = spec.with_name(f"{spec.stem}.cache{cache_mb:g}.yaml")
        spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    others = _coordinators()
    exe = str(Path(sys.executable).with_name("pbip-engine"))  # the console script beside this Python
    cmd = [exe, "run", str(spec), "--stages", "classnet", "--force", "classnet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        for pid in _coordinators() - others:
            try:
                t = psutil.Process(pid).cpu_times()
                cpu[pid] = t.user + t.system
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    out = Path(yaml.safe_load(spec.read_text())["run"]["output"])
    seconds = json.loads((out / "run.json").read_text())["stages"]["classnet"]["seconds"]
    rows = [json.loads(line) for line in (out / "classnet" / "metrics.jsonl").read_text().splitlines()]
    return {"coord_cpu_s": sum(cpu.values()), "stage_s": seconds,
            "epoch_img_s": [float(r["images_per_s"]) for r in rows]}  # fmt: skip


def compare_cache(spec: Path) -> None:
    """The classnet stage streamed every epoch, then with the spec's epoch cache; ratio of epochs 2+."""
    import yaml

    from pbip_engine.schemas.spec import ResourcesSection

    own = (yaml.safe_load(spec.read_text()).get("resources") or {}).get("train_cache_mb")
    own = ResourcesSection().train_cache_mb if own is None else own
    print(f"{spec}: classnet stage; cores={os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    res = {}
    for name, mb in (("streamed", 0), (f"cache {own:g} MiB", own)):
        r = res[name] = run_stage(spec, True, mb)
        rates = " ".join(f"{x:.1f}" for x in r["epoch_img_s"])
        print(
            f"{name:<18} stage {r['stage_s']:7.1f} s, coordinator {r['coord_cpu_s']:6.1f} CPU s, img/s per epoch {rates}"
        )
    base, new = (sum(r["epoch_img_s"][1:]) / max(1, len(r["epoch_img_s"]) - 1) for r in res.values())
    if base and new:
        print(
            f"epochs 2+: {new:.1f} vs {base:.1f} img/s = {new / base:.2f}x; load after {os.getloadavg()[0]:.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--step-ms", type=float, default=40.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--consumer-cpus", type=float, default=1.75,
                    help="CPUs the consumer reserves of the 2 (1.75: a Ray Train worker with cpus_per_worker 2)")  # fmt: skip
    ap.add_argument("--spec", type=Path, default=None, help="a finished run's spec: redo its classnet stage")
    ap.add_argument("--cache", action="store_true", help="with --spec: streamed epochs vs the epoch cache")
    args = ap.parse_args()
    if args.spec:
        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)

        if args.cache:
            compare_cache(args.spec)
            return

        print(f"{args.spec}: classnet stage; cores={os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        print(f"{'Ray Data loop':<22} {'coordinator CPU s':>18} {'stage s':>8} {'CPU s per stage s':>18}")
        for _ in range(args.repeats):
            for backoff in (False, True):
                r = run_stage(args.spec, backoff)
                name = "10 ms steps (engine)" if backoff else "as shipped"
                print(
                    f"{name:<22} {r['coord_cpu_s']:18.1f} {r['stage_s']:8.1f} {r['coord_cpu_s'] / r['stage_s']:18.3f}"
                )
        print(f"load after {os.getloadavg()[0]:.1f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        _write(data, args.rows)
        print(f"{args.rows} rows, batch {args.batch}, {args.step_ms:.0f} ms per step; cores={os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"{'Ray Data loop':<22} {'coordinator CPU s/s':>20} {'consumer s':>11} {'ideal s':>8}")
        for _ in range(args.repeats):
            for backoff in (False, True):
                r = run_once(data, args.batch, args.step_ms / 1000, backoff, args.consumer_cpus)
                name = "10 ms steps (engine)" if backoff else "as shipped"
                print(f"{name:<22} {r['coord_cpu_per_s']:20.3f} {r['consumer_s']:11.1f} {r['ideal_s']:8.1f}")
        print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
