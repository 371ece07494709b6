"""A multi-node Ray cluster on one machine, for tests, benchmarks and trying cluster features locally.

Each node is a separate ``ray start --block`` process on this machine, started in a session of its
own, so the node's whole process tree (raylet, GCS, dashboard, agents, and the worker processes, which
Ray puts in process groups of their own) shares one session id: the pid we record. Stopping a node —
or killing it to inject a fault — signals exactly the processes of that session, never ``ray stop``: other Ray work on the machine (another engineer's ``ray.init()``, a CI job) is left
alone. ``ray.cluster_utils.AutoscalingCluster.start()`` runs ``ray stop --force``, so the autoscaling
variant here starts its head itself and only reuses Ray's ``fake_multinode`` node provider.

Every cluster gets a private temp dir (short, under /tmp: Unix socket paths are limited to 107 bytes)
with one ``--temp-dir`` per node in it, ports picked per node, and — unless ``auth=False`` — its own
token file, so clients must present the token exactly as they would to a real cluster
(``client_env()`` gives the variables to set).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY_LINE = "Ray runtime started."
ASSIGNED_STATES = ("SUBMITTED_TO_WORKER", "PENDING_ARGS_FETCH", "RUNNING")
NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "runtime-env-agent-port",
)


class ClusterError(RuntimeError):
    """A local cluster node failed to start or to answer; the message carries the node's log tail."""


@dataclass
class RayNode:
    """One ``ray start --block`` process; ``pid`` is also the session id of the node's processes."""

    name: str
    kind: str  # "head" | "worker"
    pid: int
    num_cpus: float
    log: Path
    popen: subprocess.Popen = field(repr=False)
    killed: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def session_pids(self) -> list[int]:
        """Pids of every process of this node: its session (Ray puts each worker in its own process
        group, but they all stay in the session the node was started in)."""
        return [pid for pid, sid in _sessions() if sid == self.pid]

    def running(self, title: str) -> bool:
        """A Ray worker process of this node is executing ``title`` (a task or actor name) right now.

        Read from the process titles (``ray::<name>``) in /proc: no reporting delay, unlike the
        state API, so even sub-second tasks can be caught in flight.
        """
        return bool(self.pids_running(title))

    def pids_running(self, title: str) -> list[int]:
        """Pids of this node's processes whose title starts with ``ray::<title>``."""
        want = f"ray::{title}"
        return [pid for pid in self.session_pids() if (args := _cmdline(pid)) and args[0].startswith(want)]

    def node_id(self) -> str | None:
        """The Ray node id, read from this node's raylet command line (``--node_id=``)."""
        for pid in self.session_pids():
            args = _cmdline(pid)
            if args and args[0].endswith("raylet"):
                for a in args:
                    if a.startswith("--node_id="):
                        return a.split("=", 1)[1]
        return None


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the usual bind-to-0 trick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sessions() -> list[tuple[int, int]]:
    """(pid, session id) of every process we can see, from /proc (Linux)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces or parentheses: split after the last ')'.
        rest = stat.rsplit(")", 1)[1].split()
        out.append((int(d), int(rest[3])))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (not whatever is first on PATH)."""
    cand = Path(sys.executable).parent / "ray"
    if cand.exists():
        return str(cand)
    found = shutil.which("ray")
    if not found:
        raise ClusterError(
            "the `ray` command is not installed in this environment (pip install 'ray[default]')"
        )
    return found


class LocalCluster:
    """A head and ``workers`` worker nodes as separate Ray processes on 127.0.0.1.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. Nodes can be added
    (:meth:`add_worker`) and killed (:meth:`kill_worker`, SIGKILL of all the node's processes: the
    closest thing to a machine dying) while work runs.
    """

    def __init__(
        self,
        workers: int = 1,
        head_cpus: float = 1,
        worker_cpus: float = 1,
        *,
        auth: bool = True,
        object_store_mb: int = 300,
        env: Mapping[str, str] | None = None,
        temp_root: str = "/tmp",
        keep_temp: bool = False,
    ) -> None:
        self.n_workers = workers
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.auth = auth
        self.object_store_mb = object_store_mb
        self.extra_env = dict(env or {})
        self.temp_root = temp_root
        self.keep_temp = keep_temp
        self.temp_dir: Path | None = None
        self.port = 0
        self.dashboard_port = 0
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        self._token: str | None = None
        self._n_spawned = 0
        self._ports: set[int] = set()
        self.start_failures: list[str] = []  # workers that needed a second try, with their log tails

    # -- addresses and credentials ----------------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        """``ray.init(address=...)`` / ``pbip-engine run --address`` form."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The Jobs API address (``pbip-engine submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_file(self) -> Path | None:
        return self.temp_dir / "auth_token" if (self.auth and self.temp_dir) else None

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def client_env(self) -> dict[str, str]:
        """Environment variables a client process (driver, ``pbip-engine submit``) needs."""
        if not self.auth:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def _node_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # An inherited token or address would override this cluster's own.
        for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(k, None)
        env.update(self.client_env())
        # Job entrypoints (`pbip-engine run`) and workers must find this environment's scripts.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Notice a dead node in ~5 s rather than Ray's default ~15 s (matters for fault-injection tests).
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "5")
        # Task states reach the state API within 0.1 s (default 1 s): fault injection can see them.
        env.setdefault("RAY_task_events_report_interval_ms", "100")
        env.update(self.extra_env)
        return env

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _head_extra_args(self) -> list[str]:
        return []

    def _head_env(self) -> dict[str, str]:
        return self._node_env()

    def start(self, timeout: float = 150) -> LocalCluster:
        """Start the head, then the workers (in parallel), and wait until all are registered."""
        if self.head is not None:
            raise ClusterError("cluster already started")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="pbr", dir=self.temp_root))
        if self.auth:
            self._token = secrets.token_hex(32)
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._token)
        self.port, self.dashboard_port = self._new_port(), self._new_port()
        deadline = time.monotonic() + timeout
        args = [
            "--head",
            f"--port={self.port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self._new_port()}",
            f"--num-cpus={self.head_cpus:g}",
            *self._head_extra_args(),
        ]
        self.head = self._spawn("head", "head", args, self.head_cpus, self._head_env())
        self._wait_ready(self.head, deadline)
        self._wait_dashboard(deadline)
        nodes = [self._spawn_worker(self.worker_cpus) for _ in range(self.n_workers)]
        for n in nodes:
            self._wait_worker_ready(n, deadline)
        self.wait_for_nodes(1 + self.n_workers, timeout=max(1.0, deadline - time.monotonic()), at_least=True)
        return self

    def _spawn(self, name: str, kind: str, args: list[str], cpus: float, env: dict[str, str]) -> RayNode:
        assert self.temp_dir is not None
        log = self.temp_dir / f"{name}.log"
        # One temp dir per node, as on separate machines: nodes sharing one pick their socket and log
        # names (raylet.1, ...) by looking at what exists, and two starting together collide.
        node_tmp = self.temp_dir if kind == "head" else self.temp_dir / name
        cmd = [
            _ray_executable(),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={node_tmp}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            # Ports chosen here, distinct per node (Ray's own pick is racy across nodes starting at once).
            *(f"--{flag}={self._new_port()}" for flag in NODE_PORT_FLAGS),
            *args,
        ]
        with open(log, "wb") as fh:
            p = subprocess.Popen(
                cmd,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return RayNode(name=name, kind=kind, pid=p.pid, num_cpus=cpus, log=log, popen=p)

    def _new_port(self) -> int:
        while True:
            p = free_port()
            if p not in self._ports:
                self._ports.add(p)
                return p

    def _spawn_worker(self, num_cpus: float, resources: Mapping[str, float] | None = None) -> RayNode:
        self._n_spawned += 1
        i = self._n_spawned
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus:g}"]
        if resources:
            args.append(f"--resources={json.dumps(dict(resources))}")
        node = self._spawn(f"worker{i}", "worker", args, num_cpus, self._node_env())
        self.workers.append(node)
        return node

    def _wait_ready(self, node: RayNode, deadline: float) -> None:
        while True:
            if READY_LINE in node.log.read_text(errors="replace"):
                return
            if not node.alive():
                raise ClusterError(
                    f"ray node {node.name} exited ({node.popen.returncode}):\n{_tail(node.log)}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"ray node {node.name} not ready in time:\n{_tail(node.log)}")
            time.sleep(0.25)

    def _wait_worker_ready(
        self, node: RayNode, deadline: float, resources: Mapping[str, float] | None = None
    ) -> RayNode:
        """Wait for a worker; if it failed, try once more alone, with a fresh time budget.

        ``ray start`` gives a raylet 30 s to register with the GCS, which a loaded machine can miss.
        """
        try:
            self._wait_ready(node, deadline)
            return node
        except ClusterError as e:
            self.start_failures.append(str(e))
            self.workers.remove(node)
            _kill_session(node.pid, signal.SIGKILL)
            _reap(node.popen)
        again = self._spawn_worker(node.num_cpus, resources)
        self._wait_ready(again, max(deadline, time.monotonic() + 60))
        return again

    def _wait_dashboard(self, deadline: float) -> None:
        import requests

        while True:
            try:
                r = requests.get(self.dashboard_url + "/api/version", headers=self.auth_headers(), timeout=3)
                if r.ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                assert self.head is not None
                raise ClusterError(
                    f"dashboard at {self.dashboard_url} not answering:\n{_tail(self.head.log)}"
                )
            time.sleep(0.25)

    def add_worker(
        self, num_cpus: float | None = None, resources: Mapping[str, float] | None = None, timeout: float = 90
    ) -> RayNode:
        """Start one more worker node and wait until the cluster lists it as alive."""
        node = self._spawn_worker(self.worker_cpus if num_cpus is None else num_cpus, resources)
        deadline = time.monotonic() + timeout
        node = self._wait_worker_ready(node, deadline, resources)
        node_id = wait_until(
            node.node_id, max(1.0, deadline - time.monotonic()), what=f"{node.name}'s raylet"
        )
        wait_until(
            lambda: node_id in {n["node_id"] for n in self.alive_nodes()},
            max(1.0, deadline - time.monotonic()),
            what=f"{node.name} to register",
        )
        return node

    def kill_worker(
        self,
        node: RayNode | str | None = None,
        sig: int = signal.SIGKILL,
        wait_dead: bool = False,
        timeout: float = 60,
    ) -> RayNode:
        """SIGKILL every process of one worker node (fault injection); default: the last live one.

        ``node`` may be a :class:`RayNode` or a Ray node id. With ``wait_dead`` also wait until the
        GCS has noticed (its health check marks the node DEAD).
        """
        if isinstance(node, str):
            match = [w for w in self.workers if not w.killed and w.node_id() == node]
            if not match:
                raise ClusterError(f"no live local worker node has Ray node id {node}")
            node = match[0]
        if node is None:
            live = [w for w in self.workers if not w.killed and w.alive()]
            if not live:
                raise ClusterError("no live worker node to kill")
            node = live[-1]
        if node.kind == "head":
            raise ClusterError("kill_worker() kills worker nodes only; use stop() for the head")
        node_id = node.node_id()
        _kill_session(node.pid, sig)
        node.killed = True
        _reap(node.popen)
        if wait_dead and node_id:
            wait_until(
                lambda: node_id not in {n["node_id"] for n in self.alive_nodes()},
                timeout,
                what=f"the GCS to mark {node.name} dead",
            )
        return node

    def stop(self) -> None:
        """SIGKILL every node's processes (workers first), then anything left naming our temp dir."""
        for node in [*self.workers, *([self.head] if self.head else [])]:
            _kill_session(node.pid, signal.SIGKILL)
            node.killed = True
            _reap(node.popen)
        if self.temp_dir is not None:
            for pid in self.stray_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not self.keep_temp:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.head = None
        self.workers = []

    def stray_pids(self) -> list[int]:
        """Processes of this cluster outside the recorded sessions (their args name our temp dir)."""
        if self.temp_dir is None:
            return []
        key = str(self.temp_dir)
        me = os.getpid()
        return [pid for pid, _ in _sessions() if pid != me and any(key in a for a in _cmdline(pid))]

    def all_pids(self) -> list[int]:
        """Every live process of this cluster (for checks that cleanup left nothing behind)."""
        sessions = {n.pid for n in [*self.workers, *([self.head] if self.head else [])]}
        pids = {pid for pid, sid in _sessions() if sid in sessions and _is_running(pid)}
        return sorted(pids | {p for p in self.stray_pids() if _is_running(p)})

    # -- cluster state ----------------------------------------------------------------------------

    def state_api(self, resource: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """One Ray state API listing (``nodes``, ``tasks``, ``actors``...) from the dashboard."""
        import requests

        r = requests.get(
            f"{self.dashboard_url}/api/v0/{resource}",
            params={"limit": 10000, **(params or {})},
            headers=self.auth_headers(),
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Ray's view of the live nodes (state API): node_id, is_head_node, resources_total, ..."""
        return [n for n in self.state_api("nodes") if n.get("state") == "ALIVE"]

    def busy_workers(self, title: str) -> list[RayNode]:
        """Live worker nodes executing ``title`` right now (see :meth:`RayNode.running`)."""
        return [w for w in self.workers if not w.killed and w.running(title)]

    def pids_running(self, title: str) -> list[int]:
        """Pids of the live worker nodes' processes executing ``title`` (a Ray task or actor) right now."""
        return [pid for w in self.workers if not w.killed for pid in w.pids_running(title)]

    def running_tasks(
        self, name_contains: str = "", states: tuple[str, ...] = ASSIGNED_STATES
    ) -> list[dict[str, Any]]:
        """Tasks placed on a node and not finished (name, node_id, state, ...), filtered by name.

        ``ASSIGNED_STATES`` covers a task from the moment a node's worker holds it (worker start and
        argument fetch included) to its end: killing that node then forces a retry.
        """
        tasks = self.state_api(
            "tasks", {"filter_keys": "name", "filter_predicates": "!=", "filter_values": ""}
        )
        return [
            t
            for t in tasks
            if t.get("state") in states and t.get("node_id") and name_contains in (t.get("name") or "")
        ]

    def wait_for_nodes(
        self, n: int, timeout: float = 60, poll: float = 0.5, at_least: bool = False
    ) -> list[dict[str, Any]]:
        """Block until exactly (or ``at_least``) ``n`` nodes are alive; returns them."""

        def check() -> list[dict[str, Any]] | None:
            ns = self.alive_nodes()
            return ns if (len(ns) >= n if at_least else len(ns) == n) else None

        return wait_until(check, timeout, poll, what=f"{n} alive node(s) at {self.dashboard_url}")


def wait_until(fn: Callable[[], Any], timeout: float, poll: float = 0.5, what: str = "condition") -> Any:
    """Call ``fn`` until it returns something truthy (returned); ClusterError after ``timeout`` s.

    I/O errors (the dashboard refusing briefly while nodes come and go) are retried; any other
    exception from ``fn`` propagates at once.
    """
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except (OSError, ValueError, KeyError) as e:
            last_err = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last_err})" if last_err else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(poll)


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_session(sid: int, sig: int) -> None:
    """Signal every process of the session ``sid`` (a node started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)  # the session leader's own group: ray start, raylet, GCS, agents
    for pid, s in _sessions():
        if s == sid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)  # worker processes, each in a group of its own


def _reap(p: subprocess.Popen) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=10)


# -- the autoscaling fake cluster -------------------------------------------------------------------


def fake_autoscaler_config(
    head_resources: Mapping[str, float],
    worker_node_types: Mapping[str, Mapping[str, Any]],
    *,
    gcs_address: str,
    idle_timeout_minutes: float = 0.1,
    max_workers: int | None = None,
    upscaling_speed: float = 1.0,
    cluster_name: str = "pbip-local",
) -> dict[str, Any]:
    """The cluster config the ``fake_multinode`` provider needs, written out in full.

    The wheel lacks the ``example.yaml`` that ``AutoscalingCluster`` reads as its base, so every key
    the autoscaler validates is given here. ``worker_node_types``: ``{name: {"resources": {...},
    "min_workers": a, "max_workers": b}}``. ``gcs_address`` points the provider at our head (its
    default is this machine's IP on port 6379, which may be someone else's cluster).
    """
    types: dict[str, Any] = {
        "ray.head.default": {"resources": _int_resources(head_resources), "node_config": {}, "max_workers": 0}
    }
    for name, t in worker_node_types.items():
        types[name] = {
            "resources": _int_resources(t["resources"]),
            "node_config": {},
            "min_workers": int(t.get("min_workers", 0)),
            "max_workers": int(t["max_workers"]),
        }
    return {
        "cluster_name": cluster_name,
        "max_workers": max_workers
        if max_workers is not None
        else sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _int_resources(res: Mapping[str, float]) -> dict[str, int]:
    """The autoscaler schema wants whole numbers of each resource."""
    out = {}
    for k, v in res.items():
        if float(v) != int(v) or v < 0:
            raise ValueError(f"autoscaler resources must be whole numbers >= 0, got {k}={v}")
        out[k] = int(v)
    return out


class AutoscalingLocalCluster(LocalCluster):
    """A head whose autoscaler launches and removes fake worker nodes (processes on this machine).

    Follows the recipe Ray's own tests use (``fake_multinode`` provider, ``RAY_FAKE_CLUSTER=1``, a
    1 s autoscaler update interval) without ``AutoscalingCluster.start()``'s ``ray stop --force``.
    The autoscaler's nodes are children of the head's monitor process, hence in the head's session:
    :meth:`stop` takes them down with the head.
    """

    def __init__(
        self,
        worker_node_types: Mapping[str, Mapping[str, Any]],
        head_cpus: float = 0,
        *,
        idle_timeout_minutes: float = 0.1,
        upscaling_speed: float = 1.0,
        auth: bool = True,
        object_store_mb: int = 200,
        env: Mapping[str, str] | None = None,
        temp_root: str = "/tmp",
        keep_temp: bool = False,
    ) -> None:
        super().__init__(
            workers=0,
            head_cpus=head_cpus,
            auth=auth,
            object_store_mb=object_store_mb,
            env=env,
            temp_root=temp_root,
            keep_temp=keep_temp,
        )
        self.worker_node_types = {k: dict(v) for k, v in worker_node_types.items()}
        self.idle_timeout_minutes = idle_timeout_minutes
        self.upscaling_speed = upscaling_speed

    def _head_extra_args(self) -> list[str]:
        assert self.temp_dir is not None
        cfg = fake_autoscaler_config(
            {"CPU": self.head_cpus},
            self.worker_node_types,
            gcs_address=self.gcs_address,
            idle_timeout_minutes=self.idle_timeout_minutes,
            upscaling_speed=self.upscaling_speed,
        )
        path = self.temp_dir / "autoscaler.json"
        path.write_text(json.dumps(cfg, indent=2))
        return [f"--autoscaling-config={path}"]

    def _head_env(self) -> dict[str, str]:
        env = self._node_env()
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        return env

    def worker_nodes(self) -> list[dict[str, Any]]:
        """Live nodes other than the head (the ones the autoscaler launched)."""
        return [n for n in self.alive_nodes() if not n.get("is_head_node")]
