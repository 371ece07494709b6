"""The spec's ``resources`` -> Ray options, in one place (jobs/resources.py)."""

from __future__ import annotations

import pytest
import ray

from pbip_engine.jobs import resources as R
from pbip_engine.schemas.spec import ResourcesSection


def _nodes(monkeypatch: pytest.MonkeyPatch, cpus: list[float] | None) -> None:
    """Pretend the driver is connected to live nodes with these CPU counts (None: not connected)."""
    monkeypatch.setattr(ray, "is_initialized", lambda: cpus is not None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in cpus or []])


@pytest.mark.parametrize(
    ("nodes", "asked", "reserved"),
    [
        (None, 2.0, 2.0),  # not connected: as asked
        ([2.0], 2.0, 1.0),  # every CPU of the only node: leave one to Ray Data's file listing
        ([2.0], 1.0, 1.0),
        ([16.0, 4.0], 16.0, 15.0),
        ([16.0, 4.0], 4.0, 4.0),  # fits the big node with room to spare
        ([2.0], 8.0, 8.0),  # larger than any live node: the autoscaler may add one
        ([1.0, 1.0], 1.0, 1.0),  # 1-CPU nodes: the listing runs on another node
    ],
)
def test_fit_cpus(monkeypatch, nodes, asked, reserved):
    _nodes(monkeypatch, nodes)
    assert R.fit_cpus(asked) == reserved


def test_actor_pool_keeps_the_requested_threads_when_it_reserves_fewer(monkeypatch):
    _nodes(monkeypatch, [2.0])
    res = ResourcesSection(cpus_per_worker=2, autoscale={"min": 1, "max": 3})
    opts = R.actor_pool_options(res)
    assert opts["concurrency"] == (1, 3) and opts["num_cpus"] == 1.0
    assert opts["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    assert "num_gpus" not in opts
    gpu = R.actor_pool_options(ResourcesSection(cpus_per_worker=1, gpus_per_worker=0.5))
    assert gpu["num_gpus"] == 0.5 and gpu["concurrency"] == 1 and "runtime_env" not in gpu


def test_train_scaling_and_failure_config(monkeypatch):
    _nodes(monkeypatch, [4.0, 4.0])
    res = ResourcesSection(workers=2, cpus_per_worker=4, gpus_per_worker=1, max_failures=5)
    sc = R.scaling_config(res)
    assert sc.num_workers == 2 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 3.0, "GPU": 1}
    assert R.failure_config(res).max_failures == 5
    assert R.compute_threads(res) == 4
    assert R.read_options() == {"num_cpus": R.READ_CPUS}
