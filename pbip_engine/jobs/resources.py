"""The spec's ``resources`` mapped onto Ray Data actor pools and Ray Train, in one place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pbip_engine.schemas.spec import ResourcesSection

READ_CPUS = 0.25  # Parquet reads and writes are light; also each actor/worker's headroom (fit_cpus)


def read_options() -> dict[str, Any]:
    """``ray.data.read_parquet`` options: fractional-CPU read tasks."""
    return {"num_cpus": READ_CPUS}


def labelled_rows(ds: Any, labelled: bool = True) -> Any:
    """``ds``'s rows whose ``labelled`` column is ``labelled``, as an Arrow predicate: Ray Data pushes it into
    a Parquet read, so a slide's unlabelled tiles are never decoded into Python rows (a lambda filter would
    be, row by row)."""
    from ray.data.expressions import col, lit

    return ds.filter(expr=col("labelled") == lit(labelled), **read_options())


def write_options() -> dict[str, Any]:
    """``Dataset.write_parquet`` options: fractional-CPU write tasks."""
    return {"ray_remote_args": {"num_cpus": READ_CPUS}}


def write_parquet_fresh(ds: Any, path: str | Path) -> None:
    """``ds.write_parquet(path)`` into an emptied folder.

    ``write_parquet`` adds files beside those already there, and the driver keeps a failed attempt's work
    folder (same inputs) for resume: what that attempt wrote would be read, counted and trained on twice.
    """
    shutil.rmtree(path, ignore_errors=True)
    ds.write_parquet(str(path), **write_options())


def fit_cpus(cpus: float) -> float:
    """The CPUs an actor/worker reserves: a quarter CPU less than asked, so reads and writes always fit.

    Actors and Train workers that reserve every CPU of their nodes (``cpus_per_worker: 2`` on 2 cores,
    two 1-CPU Train workers on 2 cores, one 1-CPU actor per 1-CPU node) leave the Ray Data tasks that feed
    them waiting forever: a silent deadlock. Each keeps ``READ_CPUS`` free instead; torch still computes
    on ``cpus_per_worker`` threads (:func:`compute_threads`). Requests under half a CPU stay as they are.
    """
    return cpus - READ_CPUS if cpus >= 2 * READ_CPUS else cpus


def compute_threads(res: ResourcesSection) -> int:
    """torch intra-op threads per actor/worker: what the spec asked for, whatever was reserved."""
    return max(1, int(res.cpus_per_worker))


def train_threads(res: ResourcesSection) -> int:
    """torch intra-op threads per Train worker: ``train_threads`` where set, else :func:`compute_threads`."""
    return res.train_threads or compute_threads(res)


def actor_pool_options(res: ResourcesSection) -> dict[str, Any]:
    """``map_batches`` options: an autoscaling pool of (min, max) actors with per-actor CPUs/GPUs."""
    lo, hi = res.autoscale.min, res.autoscale.max
    cpus = fit_cpus(res.cpus_per_worker)
    opts: dict[str, Any] = {
        "concurrency": (max(lo, 1), hi) if hi > max(lo, 1) else hi,
        "num_cpus": cpus,
    }
    if cpus < res.cpus_per_worker:  # a little less reserved than asked for: still compute on all of them
        opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(compute_threads(res))}}
    if res.gpus_per_worker:
        opts["num_gpus"] = res.gpus_per_worker
    return opts


def scaling_config(res: ResourcesSection):
    """Ray Train ``ScalingConfig``: ``workers`` fixed workers, each reserving its CPUs (and GPUs).

    ``autoscale`` sizes only the inference actor pools; a training run keeps its workers.
    """
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
