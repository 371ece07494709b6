"""Real multi-node Ray on one machine: node bookkeeping, a worker node killed mid-stage, autoscaling.

Every cluster here is started by ``pbip_engine.jobs.local_cluster`` in a fixture whose finalizer
kills it by session id (never ``ray stop``), so other Ray work on the machine is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pbip_engine
from pbip_engine.jobs.local_cluster import AutoscalingLocalCluster, LocalCluster, _is_running, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DEMO = Path(pbip_engine.__file__).parent / "examples" / "demo.yaml"
PBIP = str(Path(sys.executable).parent / "pbip-engine")


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs: tasks must run on the workers) + 2 worker nodes (1 CPU each), token auth on."""
    with LocalCluster(workers=2, head_cpus=0, worker_cpus=1) as c:
        yield c


def _driver(
    cluster: LocalCluster, *args: str, address: bool = True, log: Path | None = None
) -> subprocess.Popen:
    """``pbip-engine ...`` as a separate driver process holding the cluster's credentials."""
    env = {**os.environ, **cluster.client_env()}
    env.pop("RAY_AUTH_TOKEN", None)
    cmd = [PBIP, *args, *(["--address", cluster.gcs_address] if address else [])]
    if log is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.timeout(300)  # includes starting the module's cluster on a possibly busy machine
def test_nodes_are_separate_processes_with_known_ids(cluster: LocalCluster) -> None:
    nodes = cluster.alive_nodes()
    assert len(nodes) == 3 and sum(n["is_head_node"] for n in nodes) == 1
    worker_ids = {n["node_id"] for n in nodes if not n["is_head_node"]}
    assert {w.node_id() for w in cluster.workers} == worker_ids
    sids = {cluster.head.pid, *(w.pid for w in cluster.workers)}
    assert len(sids) == 3 and all(os.getsid(p) == p for p in sids)  # one session per node
    assert all(len(w.session_pids()) >= 2 for w in cluster.workers)  # ray start + raylet + agents
    assert len(str(cluster.temp_dir)) < 30  # socket paths stay under the 107-byte limit
    assert cluster.token_file.stat().st_mode & 0o077 == 0


# -- a worker node dies in the middle of a stage ----------------------------------------------------------

# (stages to run, the Ray task / actor name (process title ``ray::<name>``) to catch running on a worker
# node, counts that must equal an undisturbed run's). Embed and training join once those stages exist.
FAULT_CASES = [
    pytest.param(
        "tile", "_tile_one", ("slides", "slides_done", "slides_failed", "tiles", "labelled_tiles"), id="tile"
    ),
]


@pytest.fixture(scope="module")
def cohort(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 6-slide synthetic cohort, synthesised once; specs for an undisturbed and a disturbed run."""
    tmp = tmp_path_factory.mktemp("fault")
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["synthetic"].update(slides=6, size=1024)
    raw["tiling"].update(mpp=2.0, tile_px=64)
    raw["resources"].update(max_failures=3)
    specs = {}
    for name in ("reference", "faulty"):
        raw["run"]["output"] = str(tmp / name)
        specs[name] = tmp / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump(raw))
    p = _driver(
        cluster, "run", str(specs["reference"]), "--stages", "synth", address=False, log=tmp / "synth.log"
    )
    assert p.wait(timeout=120) == 0, (tmp / "synth.log").read_text()
    # The synth output does not depend on run.output: both runs share it.
    shutil.copytree(tmp / "reference" / "synth", tmp / "faulty" / "synth")
    return {**specs, "tmp": tmp}


@pytest.fixture
def full_cluster(cluster: LocalCluster) -> LocalCluster:
    """The module cluster with two live worker nodes (a previous case may have killed one)."""
    while len([w for w in cluster.workers if not w.killed]) < 2:
        cluster.add_worker()
    return cluster


def _counts(out: Path, stage: str, keys: tuple[str, ...]) -> dict:
    run = json.loads((out / "run.json").read_text())
    assert run["stages"][stage]["status"] == "done", run["stages"][stage]
    return {k: run["stages"][stage]["counts"][k] for k in keys}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("stages", "task_name", "keys"), FAULT_CASES)
def test_stage_survives_a_worker_node_kill(
    full_cluster: LocalCluster, cohort: dict[str, Path], stages: str, task_name: str, keys: tuple[str, ...]
) -> None:
    cluster, tmp = full_cluster, cohort["tmp"]
    last = stages.split(",")[-1]
    ref = _driver(cluster, "run", str(cohort["reference"]), "--stages", stages, log=tmp / f"ref-{last}.log")
    assert ref.wait(timeout=180) == 0, (tmp / f"ref-{last}.log").read_text()[-3000:]
    expected = _counts(tmp / "reference", last, keys)

    log = tmp / f"faulty-{last}.log"
    drv = _driver(cluster, "run", str(cohort["faulty"]), "--stages", stages, log=log)

    def busy_worker():
        if drv.poll() is not None:
            raise AssertionError(f"the run ended before a {task_name} task ran on a worker node")
        busy = cluster.busy_workers(task_name)
        return busy[0] if busy else None

    try:
        victim = wait_until(
            busy_worker, timeout=120, poll=0.02, what=f"a running {task_name} task on a worker"
        )
        cluster.kill_worker(victim)
        assert drv.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if drv.poll() is None:
            drv.kill()
    assert not victim.alive() and victim.node_id() is None
    cluster.wait_for_nodes(2, timeout=60)  # the GCS marks the killed node dead
    assert _counts(tmp / "faulty", last, keys) == expected
    retried = [
        t for t in cluster.state_api("tasks", {"detail": "true"}) if task_name in (t.get("name") or "")
    ]
    assert any(t.get("attempt_number", 0) >= 1 for t in retried)  # the killed task really ran again


# -- the autoscaler -------------------------------------------------------------------------------------

DEMAND = """
import ray
ray.init(address="{address}")
@ray.remote(num_cpus=1)
class Holder:  # holds its node's only CPU while alive: two at once need two nodes
    def node(self):
        return ray.get_runtime_context().get_node_id()
holders = [Holder.remote() for _ in range(2)]
print("NODES", *ray.get([h.node.remote() for h in holders], timeout=150))
"""


@pytest.mark.timeout(240)
def test_autoscaler_adds_nodes_on_demand_and_removes_idle_ones() -> None:
    cl = AutoscalingLocalCluster(
        {"cpu1": {"resources": {"CPU": 1}, "max_workers": 2}}, head_cpus=0, idle_timeout_minutes=0.1
    )
    with cl:
        assert cl.worker_nodes() == []  # nothing to run: only the head
        env = {**os.environ, **cl.client_env()}
        env.pop("RAY_AUTH_TOKEN", None)
        r = subprocess.run(
            [sys.executable, "-c", DEMAND.format(address=cl.gcs_address)],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        used = next(line for line in r.stdout.splitlines() if line.startswith("NODES")).split()[1:]
        head = next(n["node_id"] for n in cl.alive_nodes() if n["is_head_node"])
        assert len(set(used)) == 2 and head not in used  # two new nodes, one actor each
        # Idle for 6 s (idle_timeout_minutes=0.1): both are terminated.
        wait_until(lambda: cl.worker_nodes() == [], timeout=90, what="idle worker nodes to be removed")
        group = [p for p in cl.all_pids()]
        assert group
    assert not [p for p in group if _is_running(p)]  # stop() left no process of this cluster
    assert cl.temp_dir is not None and not cl.temp_dir.exists()
