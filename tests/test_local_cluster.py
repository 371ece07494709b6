"""Real multi-node Ray on one machine: node bookkeeping, a worker node killed mid-stage, autoscaling.

Every cluster here is started by ``pbip_engine.jobs.local_cluster`` in a fixture whose finalizer
kills it by session id (never ``ray stop``), so other Ray work on the machine is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import pbip_engine
from pbip_engine.jobs.local_cluster import (
    AutoscalingLocalCluster,
    LocalCluster,
    _is_running,
    _sessions,
    wait_until,
)
from pbip_engine.jobs.manifest import read_json

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DEMO = Path(pbip_engine.__file__).parent / "examples" / "demo.yaml"
PBIP = str(Path(sys.executable).parent / "pbip-engine")


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs: tasks must run on the workers) + 2 worker nodes (1 CPU each), token auth on."""
    with LocalCluster(workers=2, head_cpus=0, worker_cpus=1) as c:
        yield c


def _driver(
    cluster: LocalCluster,
    *args: str,
    address: bool = True,
    log: Path | None = None,
    new_session: bool = False,
) -> subprocess.Popen:
    """``pbip-engine ...`` as a separate driver process holding the cluster's credentials.

    ``new_session``: in a session of its own, so that every process it started can be found (and killed).
    """
    env = {**os.environ, **cluster.client_env()}
    env.pop("RAY_AUTH_TOKEN", None)
    cmd = [PBIP, *args, *(["--address", cluster.gcs_address] if address else [])]
    kw = {"env": env, "stderr": subprocess.STDOUT, "start_new_session": new_session}
    if log is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, **kw)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, **kw)


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

# Ray Data's actor for ``map_batches(ArrowEmbedder)``; ``.submit`` while it embeds a batch.
EMBED_ACTOR = "MapWorker(MapBatches(ArrowEmbedder))"


def _tile_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(
        t
        for f in sorted((out / "tile" / "tiles").glob("*.parquet"))
        for t in pq.read_table(f)["tile_id"].to_pylist()
    )


def _embeddings(out: Path):
    import pyarrow.dataset as pads

    from pbip_engine.jobs.rundir import embeddings_dir

    return pads.dataset(str(embeddings_dir(out / "embed")), format="parquet").to_table()


def _no_partial_tiles(out: Path) -> None:
    """A task killed mid-write must leave no half-written file in the finished folder (readers glob it)."""
    assert not [p.name for p in (out / "tile").rglob(".*") if ".tmp" in p.name or p.name == ".pbip-tmp"]
    assert sorted(f.stem for f in (out / "tile" / "tiles").glob("*.parquet")) == [
        f"synth_{i:03d}" for i in range(6)
    ]


def _one_embedding_per_tile(out: Path) -> None:
    """No tile lost or embedded twice: the rows' tile ids are exactly the tile stage's, each once."""
    ids = _embeddings(out)["tile_id"].to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate embedding rows"
    assert sorted(ids) == _tile_ids(out)


# (stages to run, the Ray task / actor method (process title ``ray::<name>``) to catch running on a worker
# node, counts that must equal an undisturbed run's, an extra check of the disturbed run's output).
FAULT_CASES = [
    pytest.param(
        "tile",
        "_tile_one",
        ("slides", "slides_done", "slides_failed", "tiles", "labelled_tiles"),
        _no_partial_tiles,
        id="tile",
    ),
    # The node holding an embed actor dies while it embeds a batch: the actor restarts on the other node
    # (Ray Data's default max_restarts=-1) and the batch is retried there (max_task_retries=-1).
    pytest.param(
        "tile,embed", f"{EMBED_ACTOR}.submit", ("tiles", "slides"), _one_embedding_per_tile, id="embed"
    ),
]


@pytest.fixture(scope="module")
def cohort(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 6-slide synthetic cohort, synthesised once; specs for an undisturbed run, a run whose nodes or
    Train worker are killed, and a run whose driver is killed and re-run (same spec, other outputs)."""
    tmp = tmp_path_factory.mktemp("fault")
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["synthetic"].update(slides=6, size=1024)
    raw["tiling"].update(mpp=2.0, tile_px=64)
    raw["encoder"].update(batch_size=8)  # ~30 tiles: several batches, so the embed actor can die mid-stage
    raw["stage1"].update(epochs=3)  # a worker is killed after the first epoch's checkpoint
    raw["resources"].update(max_failures=3)
    specs = {}
    for name in ("reference", "faulty", "rerun"):
        raw["run"]["output"] = str(tmp / name)
        specs[name] = tmp / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump(raw))
    p = _driver(
        cluster, "run", str(specs["reference"]), "--stages", "synth", address=False, log=tmp / "synth.log"
    )
    assert p.wait(timeout=120) == 0, (tmp / "synth.log").read_text()
    # The synth output does not depend on run.output: every run shares it.
    for name in ("faulty", "rerun"):
        shutil.copytree(tmp / "reference" / "synth", tmp / name / "synth")
    return {**specs, "tmp": tmp}


def _two_live_workers(cluster: LocalCluster) -> LocalCluster:
    """Start worker nodes until two are alive (a previous kill may have taken one)."""
    while len([w for w in cluster.workers if not w.killed]) < 2:
        cluster.add_worker()
    return cluster


@pytest.fixture
def full_cluster(cluster: LocalCluster) -> LocalCluster:
    """The module cluster with two live worker nodes (a previous case may have killed one)."""
    return _two_live_workers(cluster)


def _counts(out: Path, stage: str, keys: tuple[str, ...]) -> dict:
    run = json.loads((out / "run.json").read_text())
    assert run["stages"][stage]["status"] == "done", run["stages"][stage]
    return {k: run["stages"][stage]["counts"][k] for k in keys}


# the embed case runs two ~1 min embed stages on a busy 2-core machine, and a missed kill one more (below)
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("stages", "task_name", "keys", "check"), FAULT_CASES)
def test_stage_survives_a_worker_node_kill(
    full_cluster: LocalCluster,
    cohort: dict[str, Path],
    stages: str,
    task_name: str,
    keys: tuple[str, ...],
    check: Callable[[Path], None] | None,
) -> None:
    cluster, tmp = full_cluster, cohort["tmp"]
    last = stages.split(",")[-1]
    ref = _driver(cluster, "run", str(cohort["reference"]), "--stages", stages, log=tmp / f"ref-{last}.log")
    assert ref.wait(timeout=240) == 0, (tmp / f"ref-{last}.log").read_text()[-3000:]
    expected = _counts(tmp / "reference", last, keys)

    def tasks() -> list[dict]:
        return [
            t for t in cluster.state_api("tasks", {"detail": "true"}) if task_name in (t.get("name") or "")
        ]

    # A kill that lands just after its task finished hits nothing to retry (a short tile task on a busy machine
    # can end between the check and the kill): then the whole disturbed run is redone and its node killed again,
    # up to three times. Every run must match the undisturbed one; one of them must have retried a killed task.
    for attempt in range(3):
        _two_live_workers(cluster)
        log = tmp / f"faulty-{last}-{attempt}.log"
        force = ["--force", stages] if attempt else []
        drv = _driver(cluster, "run", str(cohort["faulty"]), "--stages", stages, *force, log=log)

        def busy_worker(drv=drv):
            if drv.poll() is not None:
                raise AssertionError(f"the run ended before a {task_name} task ran on a worker node")
            busy = cluster.busy_workers(task_name)
            return busy[0] if busy else None

        try:
            victim = wait_until(
                busy_worker, timeout=120, poll=0.02, what=f"a running {task_name} task on a worker"
            )
            cluster.kill_worker(victim)
            assert drv.wait(timeout=240) == 0, log.read_text()[-3000:]
        finally:
            if drv.poll() is None:
                drv.kill()
        assert not victim.alive() and victim.node_id() is None
        cluster.wait_for_nodes(2, timeout=60)  # the GCS marks the killed node dead
        assert _counts(tmp / "faulty", last, keys) == expected
        if check is not None:
            check(tmp / "faulty")
        # The killed task (or the actor task in flight on the killed node) really ran again.
        if any(t.get("attempt_number", 0) >= 1 for t in tasks()):
            break
    else:
        raise AssertionError([(t.get("name"), t.get("attempt_number"), t.get("state")) for t in tasks()])


# -- a Ray Train worker dies mid-epoch ---------------------------------------------------------------------


@pytest.mark.timeout(480)
def test_train_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(
    full_cluster: LocalCluster, cohort: dict[str, Path]
) -> None:
    """SIGKILL the Ray Train worker once epoch 0's checkpoint is registered: FailureConfig restarts the
    worker group, which resumes from that checkpoint; every epoch is trained (and recorded) once."""
    cluster, tmp = full_cluster, cohort["tmp"]
    out, log = tmp / "faulty", tmp / "faulty-classnet.log"
    runs = out / ".work" / "classnet" / "ray_train" / "classnet"  # fit_on_ray's storage while it trains
    # tile and embed are up to date when the embed case ran first; run here otherwise.
    drv = _driver(cluster, "run", str(cohort["faulty"]), "--stages", "tile,embed,bank,classnet", log=log)

    def first_checkpoint() -> bool:
        if drv.poll() is not None:
            raise AssertionError(f"the run ended before a checkpoint was written:\n{log.read_text()[-3000:]}")
        snap = read_json(runs / "checkpoint_manager_snapshot.json") or {}
        return any((runs / c["checkpoint_dir_name"]).is_dir() for c in snap.get("checkpoint_results", []))

    try:
        wait_until(first_checkpoint, timeout=360, poll=0.1, what="the first epoch's checkpoint")
        victims = cluster.pids_running("RayTrainWorker")
        assert len(victims) == 1, victims  # resources.workers: 1
        os.kill(victims[0], signal.SIGKILL)
        assert drv.wait(timeout=360) == 0, log.read_text()[-3000:]
    finally:
        if drv.poll() is None:
            drv.kill()
    assert not _is_running(victims[0])
    run = json.loads((out / "run.json").read_text())["stages"]["classnet"]
    assert run["status"] == "done" and not run.get("skipped") and run["counts"]["epochs"] == 3
    history = [json.loads(line) for line in (out / "classnet" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # every epoch once: none lost, none run twice
    starts = [h["start_epoch"] for h in history]
    # Epoch 1 by the first attempt; the rest by an attempt that loaded a checkpoint instead of starting over.
    assert starts[0] == 1 and starts[-1] >= 2 and all(h["start_epoch"] <= h["epoch"] for h in history)
    assert (out / "classnet" / "last.pt").is_file() and (out / "classnet" / "best.pt").is_file()


# -- the driver dies mid-pipeline ---------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_driver_killed_mid_pipeline_then_rerun_resumes(
    full_cluster: LocalCluster, cohort: dict[str, Path]
) -> None:
    """SIGKILL ``pbip-engine run`` while embed runs on the cluster; the same command again skips the
    finished tile stage, redoes embed, runs bank, and ends with the undisturbed run's outputs."""
    import numpy as np

    from pbip_engine.engine.prototypes.bank import Bank

    cluster, tmp = full_cluster, cohort["tmp"]
    stages = ("--stages", "tile,embed,bank")
    ref = _driver(cluster, "run", str(cohort["reference"]), *stages, log=tmp / "ref-bank.log")
    assert ref.wait(timeout=300) == 0, (tmp / "ref-bank.log").read_text()[-3000:]

    out, log = tmp / "rerun", tmp / "rerun-killed.log"
    drv = _driver(cluster, "run", str(cohort["rerun"]), *stages, log=log, new_session=True)

    def embed_running() -> bool:
        if drv.poll() is not None:
            raise AssertionError(f"the run ended before embed ran:\n{log.read_text()[-3000:]}")
        tile = (read_json(out / "run.json") or {}).get("stages", {}).get("tile", {})
        started = tile.get("status") == "done" and (out / ".work" / "embed" / "manifest.json").is_file()
        return started and bool(cluster.busy_workers(EMBED_ACTOR))

    try:
        wait_until(embed_running, timeout=240, poll=0.1, what="the embed stage to run on the cluster")
        os.kill(drv.pid, signal.SIGKILL)
        assert drv.wait(timeout=30) == -signal.SIGKILL
    finally:
        if drv.poll() is None:
            drv.kill()
        orphans = [pid for pid, sid in _sessions() if sid == drv.pid and _is_running(pid)]
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
    assert not orphans  # the driver started no process that outlives it
    tile_manifest = out / "tile" / "manifest.json"
    tile_before = (tile_manifest.stat().st_mtime_ns, tile_manifest.read_bytes())
    assert not (out / "embed").exists() and (out / ".work" / "embed").is_dir()  # interrupted mid-stage

    # The cluster shrugs off the dead driver: all nodes alive, its job's embed actors gone.
    cluster.wait_for_nodes(3, timeout=60)
    wait_until(lambda: not cluster.busy_workers(EMBED_ACTOR), 90, what="the dead driver's embed actors to go")

    log2 = tmp / "rerun.log"
    again = _driver(cluster, "run", str(cohort["rerun"]), *stages, log=log2)
    assert again.wait(timeout=300) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    assert "[tile] up to date" in text and "[tile] running" not in text
    run = json.loads((out / "run.json").read_text())["stages"]
    assert run["tile"] == {"status": "done", "skipped": True, "input_hash": run["tile"]["input_hash"]}
    assert (tile_manifest.stat().st_mtime_ns, tile_manifest.read_bytes()) == tile_before  # not rewritten
    assert run["embed"]["status"] == "done" and not run["embed"].get("skipped")
    assert run["bank"]["status"] == "done" and not run["bank"].get("skipped")
    assert not [p.name for p in (out / ".work").iterdir()]  # no half-done stage folder left behind

    # Same outputs as the undisturbed run.
    reference = tmp / "reference"
    assert _tile_ids(out) == _tile_ids(reference)
    _one_embedding_per_tile(out)
    got_emb, want_emb = (_embeddings(o).sort_by("tile_id") for o in (out, reference))
    assert got_emb["tile_id"].to_pylist() == want_emb["tile_id"].to_pylist()
    vectors = [
        np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        for t in (got_emb, want_emb)
    ]
    assert np.allclose(*vectors, atol=1e-2)  # the same encoder on the same tiles
    got, want = Bank.load(out / "bank"), Bank.load(reference / "bank")
    assert got.class_names == want.class_names and list(got.k) == list(want.k)
    # Same embeddings in another row order (Ray Data writes batches as they finish) must give the same bank.
    assert np.allclose(got.prototypes, want.prototypes, atol=1e-2), (
        "bank depends on the embeddings' row order"
    )


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
