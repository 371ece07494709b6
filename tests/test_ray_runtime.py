"""ray_runtime: every Ray worker gets the engine's setup hook, and Ray Data's idle loop backs off."""

from __future__ import annotations

import pytest

from pbip_engine.jobs import ray_runtime as rr


class _Op:
    def __init__(self, active: int) -> None:
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


@pytest.mark.parametrize(
    ("go", "active", "sleeps"), [(True, [0, 0], 1), (True, [0, 2], 0), (False, [0, 0], 0)]
)
def test_loop_step_sleeps_only_when_it_goes_on_with_nothing_running(monkeypatch, go, active, sleeps):
    slept: list[float] = []
    monkeypatch.setattr(rr.time, "sleep", slept.append)
    step = rr.with_idle_backoff(lambda self, topology: go)
    assert step(None, {_Op(a): None for a in active}) is go
    assert slept == [rr.IDLE_BACKOFF_S] * sleeps


def test_switch_off(monkeypatch):
    monkeypatch.setenv("PBIP_RAY_IDLE_BACKOFF", "0")
    assert rr.patch_idle_spin() is False


def test_worker_processes_run_the_setup_hook():
    """Tasks and actors with their own runtime_env (the actor pools' OMP threads) get the hook too."""
    import ray

    from pbip_engine.schemas.spec import ResourcesSection

    def patched() -> bool:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor

        return bool(getattr(StreamingExecutor, "_pbip_idle_backoff", False))

    rr.ensure_ray(None, ResourcesSection(local_cpus=1))
    try:
        assert patched()  # the driver
        task = ray.remote(num_cpus=0.25)(patched)
        assert ray.get(task.remote())
        env = {"env_vars": {"OMP_NUM_THREADS": "1"}}
        assert ray.get(task.options(runtime_env=env).remote())
    finally:
        rr.shutdown_ray()
