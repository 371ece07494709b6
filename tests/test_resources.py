"""The spec's ``resources`` -> Ray options, in one place (jobs/resources.py)."""

from __future__ import annotations

import pytest

from pbip_engine.jobs import resources as R
from pbip_engine.schemas.spec import ResourcesSection


@pytest.mark.parametrize(
    ("asked", "reserved"), [(2.0, 1.75), (1.0, 0.75), (16.0, 15.75), (0.5, 0.25), (0.3, 0.3)]
)
def test_fit_cpus_leaves_room_for_reads_and_writes(asked, reserved):
    assert R.fit_cpus(asked) == reserved
    assert asked - R.fit_cpus(asked) in (0.0, R.READ_CPUS)


def test_actor_pool_keeps_the_requested_threads_when_it_reserves_fewer():
    res = ResourcesSection(cpus_per_worker=2, autoscale={"min": 1, "max": 3})
    opts = R.actor_pool_options(res)
    assert opts["concurrency"] == (1, 3) and opts["num_cpus"] == 1.75
    assert opts["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    assert "num_gpus" not in opts
    gpu = R.actor_pool_options(ResourcesSection(cpus_per_worker=0.25, gpus_per_worker=0.5))
    assert gpu["num_gpus"] == 0.5 and gpu["concurrency"] == 1 and "runtime_env" not in gpu


def test_train_scaling_and_failure_config():
    res = ResourcesSection(workers=2, cpus_per_worker=4, gpus_per_worker=1, max_failures=5)
    sc = R.scaling_config(res)
    assert sc.num_workers == 2 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 3.75, "GPU": 1}
    assert R.failure_config(res).max_failures == 5
    assert R.compute_threads(res) == 4
    assert R.read_options() == {"num_cpus": R.READ_CPUS}
    assert R.write_options() == {"ray_remote_args": {"num_cpus": R.READ_CPUS}}


def test_train_threads_default_to_the_workers_cpus_and_can_be_raised_alone():
    # The demo's 1-CPU workers leave two segment actors room on 2 cores; its single Train worker, whose shard
    # is read before the first step, may still compute on both cores without reserving them.
    res = ResourcesSection(cpus_per_worker=1)
    assert R.train_threads(res) == R.compute_threads(res) == 1
    raised = ResourcesSection(cpus_per_worker=1, train_threads=2)
    assert R.train_threads(raised) == 2
    assert R.scaling_config(raised).resources_per_worker == {"CPU": 0.75}
    assert R.actor_pool_options(raised)["num_cpus"] == 0.75 and "runtime_env" in R.actor_pool_options(raised)
