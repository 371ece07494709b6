"""Starting or joining Ray, in one place, so every stage maps the spec's resources the same way."""

from __future__ import annotations

import os

from pbip_engine.schemas.spec import ResourcesSection


def configure_ray_data() -> None:
    """Ray Data settings of every driver: the V1 Parquet reader.

    Ray 2.60's V2 reader lists files in a task that asks for a whole CPU and cannot be told otherwise;
    with the actors/Train workers holding the rest, that task never starts. V1 read tasks take the
    ``num_cpus`` we give them (``resources.read_options``).
    """
    from ray.data import DataContext

    DataContext.get_current().use_datasource_v2 = False


def ensure_ray(address: str | None, resources: ResourcesSection) -> None:
    """Connect to ``address`` (a running cluster), or start an embedded local Ray."""
    import ray

    configure_ray_data()
    if ray.is_initialized():
        return
    # Workers must import pbip_engine before torch (see pbip_engine.__init__): make that the
    # first import of every worker process.
    env = {"env_vars": {"PBIP_ENGINE_WORKER": "1"}}
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
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = True
        ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - older Ray
        pass


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
