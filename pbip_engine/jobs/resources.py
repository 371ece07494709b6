"""The spec's ``resources`` mapped onto Ray Data actor pools and Ray Train, in one place."""

from __future__ import annotations

from typing import Any

from pbip_engine.schemas.spec import ResourcesSection


def actor_pool_options(res: ResourcesSection) -> dict[str, Any]:
    """``map_batches`` options: an autoscaling pool of (min, max) actors with per-actor CPUs/GPUs."""
    lo, hi = res.autoscale.min, res.autoscale.max
    opts: dict[str, Any] = {
        "concurrency": (max(lo, 1), hi) if hi > max(lo, 1) else hi,
        "num_cpus": res.cpus_per_worker,
    }
    if res.gpus_per_worker:
        opts["num_gpus"] = res.gpus_per_worker
    return opts


def scaling_config(res: ResourcesSection):
    """Ray Train ``ScalingConfig``: fixed ``workers``, or elastic (min, max) when autoscale asks for it."""
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    return ScalingConfig(
        num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker
    )


def failure_config(res: ResourcesSection):
    from ray.train import FailureConfig

    return FailureConfig(max_failures=res.max_failures)
