"""How long a cluster takes to grow: local node start-up, and autoscaler scale-up / scale-down.

    python bench/bench_cluster.py [--repeats 2] [--idle-timeout-s 6] [--out bench_cluster.json]

Everything runs on this machine through ``pbip_engine.jobs.local_cluster`` (separate Ray processes,
token auth on, killed by session id at the end). Measured:

* ``local_head_s`` / ``local_worker_s``: ``ray start`` of a head (dashboard included) and of one
  worker node until the cluster lists it;
* ``scale_up_node_s``: a 1-CPU task submitted to a head with 0 CPUs until the autoscaler's new node
  is alive; ``scale_up_task_s``: until the task starts running on it; ``first_result_s``: until its
  result is back;
* ``scale_down_s``: from the task's end until the idle node is gone (includes the idle timeout).

On a real cloud the scale-up is dominated by instance boot and image pull (minutes), which this does
not model; what it measures is the autoscaler's own reaction time and Ray's node start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.io.atomic import atomic_write_text
from pbip_engine.jobs.local_cluster import AutoscalingLocalCluster, LocalCluster, wait_until

DRIVER = """
import json, time, ray
ray.init(address="{address}")
@ray.remote(num_cpus=1)
def probe():
    return time.time(), ray.get_runtime_context().get_node_id()
t0 = time.time()
started, node = ray.get(probe.remote(), timeout=300)
print("RESULT", json.dumps({{"submitted": t0, "task_started": started, "returned": time.time(), "node": node}}))
"""


def measure_local_start() -> dict[str, float]:
    t0 = time.monotonic()
    with LocalCluster(workers=0, head_cpus=1) as c:
        head_s = time.monotonic() - t0
        t1 = time.monotonic()
        c.add_worker()
        worker_s = time.monotonic() - t1
    return {"local_head_s": round(head_s, 2), "local_worker_s": round(worker_s, 2)}


def measure_autoscaler(idle_timeout_s: float = 6.0) -> dict[str, float]:
    cl = AutoscalingLocalCluster(
        {"cpu1": {"resources": {"CPU": 1}, "max_workers": 1}},
        head_cpus=0,
        idle_timeout_minutes=idle_timeout_s / 60,
    )
    with cl:
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watch() -> None:  # wall-clock time at which the new node is first listed alive
            while not stop.is_set():
                try:
                    if cl.worker_nodes():
                        seen.setdefault("node_alive", time.time())
                        return
                except OSError:
                    pass
                time.sleep(0.2)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        env = {**os.environ, **cl.client_env()}
        env.pop("RAY_AUTH_TOKEN", None)
        r = subprocess.run(
            [sys.executable, "-c", DRIVER.format(address=cl.gcs_address)],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        stop.set()
        th.join(timeout=5)
        if r.returncode != 0:
            raise RuntimeError(f"probe driver failed:\n{r.stderr[-3000:]}")
        res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT ") :])
        t_end = time.time()
        wait_until(
            lambda: cl.worker_nodes() == [], timeout=idle_timeout_s + 120, poll=0.25, what="scale-down"
        )
        down = time.time() - t_end
    out = {
        "scale_up_task_s": res["task_started"] - res["submitted"],
        "first_result_s": res["returned"] - res["submitted"],
        "scale_down_s": down,
        "idle_timeout_s": idle_timeout_s,
    }
    if "node_alive" in seen:
        out["scale_up_node_s"] = seen["node_alive"] - res["submitted"]
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--idle-timeout-s", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        row = {**measure_local_start(), **measure_autoscaler(args.idle_timeout_s)}
        print(f"run {i + 1}: {json.dumps(row)}", flush=True)
        runs.append(row)
    summary = {k: round(statistics.median(r[k] for r in runs if k in r), 2) for k in runs[0]}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "runs": runs,
        "median": summary,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
