"""The stage base classes and registry: each pipeline stage is a small class the driver runs in order.

A stage reads its upstream stages' finished folders and writes into its own work folder, which the
driver renames into place only when the stage returns. Stages that process slides one by one keep
per-unit state in the work folder so an interrupted or partially failed run resumes where it stopped.
This module imports no stage (every stage imports it); the built-in stage list is ``jobs.stages``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbip_engine.schemas.spec import JobSpec


def unit_reason(unit: dict[str, Any]) -> str | None:
    """Why a unit (a slide) failed, as the user should read it: its message (file and cause) where it has
    one, else its reason code ("labels", "unreadable")."""
    return unit.get("message") or unit.get("reason")


@dataclass
class StageResult:
    counts: dict[str, Any] = field(default_factory=dict)
    units: dict[str, dict[str, Any]] = field(default_factory=dict)  # per slide: status, reason, ...
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_units(self) -> list[str]:
        return sorted(k for k, v in self.units.items() if v.get("status") == "failed")

    @property
    def status(self) -> str:
        return "partial" if self.failed_units else "done"


@dataclass
class StageContext:
    spec: JobSpec
    output: Path
    work_dir: Path
    address: str | None
    log: Callable[[str], None]
    progress: bool = True

    def stage_dir(self, name: str) -> Path:
        """Finished output folder of an upstream stage."""
        d = self.output / name
        if not d.is_dir():
            raise RuntimeError(f"stage {name!r} has no finished output at {d}; run it first")
        return d

    def ray(self, *, data: bool = True) -> None:
        """Start (or connect to) Ray only when a stage needs it; ``data=False`` when it needs no Ray Data."""
        from pbip_engine.jobs.ray_runtime import ensure_ray

        ensure_ray(self.address, self.spec.resources, data=data)


class Stage:
    name: str = ""
    deps: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()  # spec sections whose values change this stage's output
    version: int = 1  # bump when the stage's output format or algorithm changes

    def enabled(self, spec: JobSpec) -> bool:
        return self.not_needed(spec) is None

    def not_needed(self, spec: JobSpec) -> str | None:
        """Why this spec's method does without this stage (shown as "not needed" in run.json), else None.

        Only the method-specific stages (``methods.base.METHOD_STAGES``) can be not needed; a stage that is
        merely off for this spec (synth without ``data.synthetic``) overrides ``enabled`` instead.
        """
        from pbip_engine.methods import get_method
        from pbip_engine.methods.base import METHOD_STAGES

        method = get_method(spec.method.name)
        if self.name in METHOD_STAGES and self.name not in method.uses_stages(spec.method):
            return f"method {method.name!r} does not use {METHOD_STAGES[self.name]}"
        return None

    def spec_json(self, spec: JobSpec) -> str:
        """The part of the spec this stage's input hash covers: its ``sections``, whole unless overridden."""
        return spec.section_json(*self.sections)

    def dependencies(self, spec: JobSpec) -> tuple[str, ...]:
        """Upstream stages that this spec enables (a stage may follow synth or real slides)."""
        return tuple(d for d in self.deps if get_stage(d).enabled(spec))

    def run(self, ctx: StageContext) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError


_REGISTRY: dict[str, Stage] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    inst = cls()
    if not inst.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[inst.name] = inst
    return cls


def all_stages() -> list[Stage]:
    """Registered stages in data-flow order: each after every stage it depends on (registration order
    breaks ties). Only what has been imported is registered: ``jobs.stages`` imports the built-in ones."""
    ordered: list[Stage] = []
    placed: set[str] = set()
    pending = list(_REGISTRY.values())
    while pending:
        ready = [s for s in pending if all(d in placed or d not in _REGISTRY for d in s.deps)]
        if not ready:
            raise RuntimeError(f"stage dependency cycle among {[s.name for s in pending]}")
        for s in ready:
            ordered.append(s)
            placed.add(s.name)
            pending.remove(s)
    return ordered


def get_stage(name: str) -> Stage:
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; stages are {list(_REGISTRY)}")
    return _REGISTRY[name]


def stage_names(stages: Iterable[Stage]) -> list[str]:
    return [s.name for s in stages]
