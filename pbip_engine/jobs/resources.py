"""The spec's ``resources`` mapped onto Ray Data actor pools and Ray Train, in one place."""

from __future__ import annotations

from typing import Any

from pbip_engine.schemas.spec import ResourcesSection

READ_CPUS = 0.25  # Parquet reads are light


def read_options() -> dict[str, Any]:
    """``ray.data.read_parquet`` options: fractional-CPU read tasks."""
    return {"num_cpus": READ_CPUS}


def fit_cpus(cpus: float) -> float:
    """Per-actor/worker CPUs, lowered to leave one CPU of the largest live node to Ray Data's own tasks.

    Ray 2.60's Parquet reader lists files in a task that needs a whole CPU; ``cpus_per_worker: 2`` on a
    2-core machine would hold every CPU while that task waits for one: a silent deadlock. Requests larger
    than any live node are left alone (the autoscaler may bring bigger nodes), as are 1-CPU nodes.
    """
    import ray

    if not ray.is_initialized():
        return cpus
    biggest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if biggest >= 2 and biggest - 1 < cpus <= biggest:
        return biggest - 1
    return cpus


def compute_threads(res: ResourcesSection) -> int:
    """torch intra-op threads per actor/worker: what the spec asked for, whatever was reserved."""
    return max(1, int(res.cpus_per_worker))


def actor_pool_options(res: ResourcesSection) -> dict[str, Any]:
    """``map_batches`` options: an autoscaling pool of (min, max) actors with per-actor CPUs/GPUs."""
    lo, hi = res.autoscale.min, res.autoscale.max
    cpus = fit_cpus(res.cpus_per_worker)
    opts: dict[str, Any] = {
        "concurrency": (max(lo, 1), hi) if hi > max(lo, 1) else hi,
        "num_cpus": cpus,
    }
    if cpus < res.cpus_per_worker:  # fewer CPUs reserved than asked for: still compute on all of them
        opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(compute_threads(res))}}
    if res.gpus_per_worker:
        opts["num_gpus"] = res.gpus_per_worker
    return opts


def scaling_config(res: ResourcesSection):
    """Ray Train ``ScalingConfig``: fixed ``workers``, or elastic (min, max) when autoscale asks for it."""
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": fit_cpus(res.cpus_per_worker)}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    return ScalingConfig(
        num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker
    )


def failure_config(res: ResourcesSection):
    from ray.train import FailureConfig

    return FailureConfig(max_failures=res.max_failures)
