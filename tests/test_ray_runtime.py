"""ray_runtime: every Ray worker gets the engine's setup hook; Ray Data's loop steps take >= 10 ms."""

from __future__ import annotations

import pytest

from pbip_engine.jobs import ray_runtime as rr


@pytest.mark.parametrize(
    ("go", "takes", "sleeps"), [(True, 0.0, True), (True, 0.05, False), (False, 0.0, False)]
)
def test_loop_step_waits_out_the_rest_of_its_period(monkeypatch, go, takes, sleeps):
    clock = iter([100.0, 100.0 + takes])
    slept: list[float] = []
    monkeypatch.setattr(rr.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(rr.time, "sleep", slept.append)
    step = rr.with_min_period(lambda self, topology: go)
    assert step(None, {}) is go
    assert slept == ([pytest.approx(rr.MIN_STEP_S)] if sleeps else [])


def test_switch_off(monkeypatch):
    monkeypatch.setenv("PBIP_RAY_IDLE_BACKOFF", "0")
    assert rr.patch_idle_spin() is False


@pytest.mark.parametrize("data", [True, False])
def test_ray_data_is_configured_only_for_stages_that_use_it(monkeypatch, data):
    """The tile stage runs plain tasks: it should not pay the driver ~1 s to import Ray Data."""
    import ray

    from pbip_engine.schemas.spec import ResourcesSection

    calls: list[bool] = []
    monkeypatch.setattr(rr, "configure_ray_data", lambda: calls.append(True))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    rr.ensure_ray(None, ResourcesSection(local_cpus=1), data=data)
    assert calls == ([True] if data else [])


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
