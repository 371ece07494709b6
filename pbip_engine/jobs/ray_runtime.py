"""Starting or joining Ray, in one place, so every stage maps the spec's resources the same way."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

from pbip_engine.schemas.spec import ResourcesSection

MIN_STEP_S = 0.01
"""Shortest period of a Ray Data scheduling-loop step (see :func:`patch_idle_spin`)."""


def configure_ray_data() -> None:
    """Ray Data settings of every driver: the V1 Parquet reader.

    Ray 2.60's V2 reader lists files in a task that asks for a whole CPU and cannot be told otherwise;
    with the actors/Train workers holding the rest, that task never starts. V1 read tasks take the
    ``num_cpus`` we give them (``resources.read_options``).
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    patch_idle_spin()


def patch_idle_spin() -> bool:
    """Stop Ray Data's scheduling loop from spinning while it waits on a slow consumer.

    Ray 2.60's ``StreamingExecutor`` loop blocks in ``ray.wait`` (up to 0.1 s) only for running tasks.
    When the CPU budget holds every read back, no task runs, nothing waits, and the loop repeats at once
    (a backpressured read whose output is ready makes ``ray.wait`` return at once too): 0.57-0.72 CPU s/s
    for whole GlaS training stages in the ``SplitCoordinator`` that feeds a Ray Train worker. Giving
    each step at least 10 ms matches the 10 ms poll of Ray's own output queue, so no block reaches its
    consumer later than before, and a step that waited or worked longer is not delayed at all.
    ``PBIP_RAY_IDLE_BACKOFF=0`` turns this off. Returns whether the patch is (now) in place.
    """
    if os.environ.get("PBIP_RAY_IDLE_BACKOFF", "1") == "0":
        return False
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # pragma: no cover - Ray moved it: run unpatched
        return False
    if getattr(StreamingExecutor, "_pbip_idle_backoff", False):
        return True
    StreamingExecutor._scheduling_loop_step = with_min_period(StreamingExecutor._scheduling_loop_step)
    StreamingExecutor._pbip_idle_backoff = True
    return True


def with_min_period(step: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """``step``, then a sleep for what is left of :data:`MIN_STEP_S` when the loop goes on."""

    @functools.wraps(step)
    def scheduling_loop_step(self: Any, topology: Any) -> bool:
        t0 = time.perf_counter()
        go = step(self, topology)
        rest = MIN_STEP_S - (time.perf_counter() - t0)
        if go and rest > 0:
            time.sleep(rest)
        return go

    return scheduling_loop_step


def worker_setup() -> None:
    """Every Ray worker process (``worker_process_setup_hook``): the engine's import order, then the patch.

    Importing ``pbip_engine`` first loads cuCIM before torch (see ``pbip_engine.__init__``); the
    ``SplitCoordinator`` actors that Ray Train starts run Ray Data's executor, hence the patch there.
    """
    import pbip_engine  # noqa: F401

    patch_idle_spin()


def ensure_ray(address: str | None, resources: ResourcesSection, *, data: bool = True) -> None:
    """Connect to ``address`` (a running cluster), or start an embedded local Ray.

    ``data=False`` for stages that only run tasks: importing Ray Data costs the driver ~1 s.
    """
    import ray

    if data:
        configure_ray_data()
    if ray.is_initialized():
        return
    # Workers must import pbip_engine before torch (see pbip_engine.__init__): make that the
    # first import of every worker process.
    env = {
        "env_vars": {"PBIP_ENGINE_WORKER": "1"},
        "worker_process_setup_hook": "pbip_engine.jobs.ray_runtime.worker_setup",
    }
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    ray.init(
        num_cpus=resources.local_cpus or os.cpu_count(),
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
