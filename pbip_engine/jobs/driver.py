"""The pipeline driver behind ``pbip-engine run``.

For each stage: hash its inputs (spec sections + upstream hashes), skip it when a finished manifest
with that hash exists, otherwise run it into ``<output>/.work/<stage>/`` and rename that into
``<output>/<stage>/`` on success. A stage that raises leaves no ``<output>/<stage>/`` behind (a
previous good one stays untouched), writes ``<output>/manifests/<stage>.json`` with status
``failed``, and stops the run. ``<output>/run.json`` summarises every stage.
"""

from __future__ import annotations

import re
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbip_engine.engine.io.atomic import temp_dirs
from pbip_engine.engine.io.terminal import ANSI
from pbip_engine.jobs.manifest import MANIFEST, input_hash, new_manifest, read_json, write_json_atomic
from pbip_engine.jobs.stage import Stage, StageContext, unit_reason
from pbip_engine.jobs.stages import all_stages
from pbip_engine.schemas.spec import JobSpec, SpecError, check_inputs


@dataclass
class RunSummary:
    output: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier runs' stages included
    selected: set[str] = field(default_factory=set)  # this invocation's stages: they set the exit code

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.stages.items() if v["status"] == "failed" and k in self.selected]

    @property
    def partial(self) -> list[str]:
        return [k for k, v in self.stages.items() if v["status"] == "partial" and k in self.selected]

    @property
    def exit_code(self) -> int:
        """0 all done; 1 a stage failed; 2 some slides failed but the run completed."""
        if self.failed:
            return 1
        return 2 if self.partial else 0


def check_upstream(spec: JobSpec, stages: Sequence[Stage], out: Path) -> None:
    """Before anything runs: each selected stage's upstream stages run now or have finished in ``out``.

    Catches e.g. ``method: {name: lpd, init: bank}`` with ``--stages`` leaving out a bank that was never built,
    which would otherwise fail only when the stage-1 stage is reached, after the earlier stages ran.
    """
    from pbip_engine.methods.base import METHOD_STAGES

    selected = {s.name for s in stages}
    for stage in stages:
        missing = [
            d for d in stage.dependencies(spec) if d not in selected and not (out / d / MANIFEST).exists()
        ]
        if missing:
            why = [
                f"method {spec.method.name!r} with these method: keys uses the {d}"
                for d in missing
                if d in METHOD_STAGES
            ]
            raise SpecError(
                f"--stages: stage {stage.name!r} needs {missing}: not selected and not finished in "
                f"{out}" + (f" ({'; '.join(why)})" if why else "") + "; add it to --stages"
            )


def check_stage_names(names: Sequence[str], option: str, also: Sequence[str] = ()) -> None:
    """SpecError naming ``option`` when ``names`` is empty or holds a name that is no stage (nor in ``also``)."""
    known = sorted(s.name for s in all_stages())
    extra = "".join(f" or {a!r}" for a in also)
    if not names:
        raise SpecError(f"{option}: no stage named; stages are {known}{extra}")
    unknown = sorted({n for n in names if n not in known and n not in also})
    if unknown:
        raise SpecError(f"{option}: unknown stage(s) {unknown}; stages are {known}{extra}")


def select_stages(spec: JobSpec, only: Sequence[str] | None) -> list[Stage]:
    stages = [s for s in all_stages() if s.enabled(spec)]
    if only is None:
        return stages
    check_stage_names(only, "--stages")
    by_name = {s.name: s for s in all_stages()}
    unneeded = {n: by_name[n].not_needed(spec) for n in only if by_name[n].not_needed(spec)}
    if unneeded:
        raise SpecError(f"--stages: {', '.join(f'{n}: {why}' for n, why in unneeded.items())}")
    disabled = [n for n in only if n not in {s.name for s in stages}]
    if disabled:
        raise SpecError(f"--stages: {disabled} not enabled by this spec (e.g. synth needs data.synthetic)")
    return [s for s in stages if s.name in only]


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(Error|Exception|Exit): \S")


def stage_error(e: BaseException) -> str:
    """``Type: message`` of a failed stage, led by the stage's own error where Ray wrapped it.

    An actor's ``__init__`` or a Train worker that raised reaches the driver as Ray's ActorDiedError /
    WorkerGroupError, whose first line names Ray's machinery; the real error is the last line of the
    traceback in its text, and that is what the user can act on, so it comes first (the console shows
    the first line). Ray's colour codes go.
    """
    text = ANSI.sub("", str(e)).strip()
    whole = f"{type(e).__name__}: {text}"
    if type(e).__module__.split(".")[0] != "ray":
        return whole
    causes = [ln.strip() for ln in text.splitlines() if _ERROR_LINE.match(ln.strip())]
    causes = [c for c in causes if not c.startswith("ray.")]
    if not causes:
        return whole
    name, _, message = causes[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {message} (raised in a Ray worker)\n{whole}"


def _drop_temp_files(work: Path) -> list[Path]:
    """Delete what atomic writes that never finished left behind: a worker killed mid-write (a retried
    task) leaves its temp file in a ``.pbip-tmp/`` folder (``engine.io.atomic``). Only those folders are
    swept, so no user file is taken for a temp file by its name (a slide called ``.tmp-scan.svs``)."""
    stale: list[Path] = []
    for d in temp_dirs(work):
        stale.extend(p for p in d.rglob("*") if p.is_file())
        shutil.rmtree(d, ignore_errors=True)
    return stale


def _swap_into_place(work: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{int(time.time() * 1000)}")
    if final.exists():
        final.rename(old)
    work.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def run_pipeline(
    spec: JobSpec,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    address: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> RunSummary:
    if spec.run.is_uri:
        raise SpecError(
            f"run.output: {spec.run.output!r} is a URI; the local driver writes to a filesystem path "
            "(mount the bucket, or use a shared filesystem path on the cluster)"
        )
    check_inputs(spec)
    stages = select_stages(spec, only)
    check_upstream(spec, stages, Path(spec.run.output))
    force_set = set(force)
    if force_set:
        check_stage_names(force, "--force", also=("all",))
    if "all" in force_set:
        force_set = {s.name for s in stages}
    out = Path(spec.run.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(out)
    prev = read_json(out / "run.json") or {}
    summary.stages.update(prev.get("stages", {}))
    hashes: dict[str, str] = {}

    for stage in all_stages():
        why_not = stage.not_needed(spec)
        if why_not:
            summary.stages[stage.name] = {"status": "not needed", "reason": why_not}
            continue
        if not stage.enabled(spec):
            continue
        deps = stage.dependencies(spec)
        upstream = {d: hashes.get(d) or _finished_hash(out, d) or "" for d in deps}
        spec_json = stage.spec_json(spec)
        h = input_hash(stage.name, stage.version, spec_json, upstream)
        hashes[stage.name] = h
        if stage not in stages:
            continue
        summary.selected.add(stage.name)
        final = out / stage.name
        manifest = read_json(final / MANIFEST)
        up_to_date = manifest and manifest.get("input_hash") == h and manifest.get("status") == "done"
        if up_to_date and stage.name not in force_set:
            log(f"[{stage.name}] up to date ({h}), skipped")
            summary.stages[stage.name] = {"status": "done", "skipped": True, "input_hash": h}
            _write_run_json(out, spec, summary)
            continue
        missing = [d for d in deps if not (out / d / MANIFEST).exists()]
        if missing:
            raise SpecError(
                f"stage {stage.name!r} needs {missing} to have run first (drop --stages or add them)"
            )

        work = out / ".work" / stage.name
        prev_work = read_json(work / MANIFEST) or {}
        if stage.name in force_set or (work.exists() and prev_work.get("input_hash") != h):
            shutil.rmtree(work, ignore_errors=True)
        if (
            stage.name not in force_set
            and not work.exists()
            and manifest
            and manifest.get("input_hash") == h
            and manifest.get("status") == "partial"
        ):
            # Same inputs, some units failed last time: resume from the finished folder's state.
            shutil.copytree(final, work)
        work.mkdir(parents=True, exist_ok=True)
        m = new_manifest(stage.name, h, {"spec": spec_json, "upstream": upstream})
        write_json_atomic(work / MANIFEST, m)

        log(f"[{stage.name}] running ({h})")
        ctx = StageContext(spec=spec, output=out, work_dir=work, address=address, log=log, progress=progress)
        t0 = time.perf_counter()
        try:
            result = stage.run(ctx)
        except BaseException as e:
            m.update(
                status="failed",
                error=stage_error(e),
                traceback=traceback.format_exc(),
                seconds=round(time.perf_counter() - t0, 3),
            )
            write_json_atomic(out / "manifests" / f"{stage.name}.json", m)
            write_json_atomic(work / MANIFEST, m)
            summary.stages[stage.name] = {"status": "failed", "error": m["error"], "input_hash": h}
            _write_run_json(out, spec, summary)
            log(f"[{stage.name}] FAILED: {m['error']}")
            if isinstance(e, KeyboardInterrupt):
                raise
            return summary
        m.update(
            status=result.status,
            seconds=round(time.perf_counter() - t0, 3),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            counts=result.counts,
            units=result.units,
            failed_units=result.failed_units,
            **result.extra,
        )
        write_json_atomic(work / MANIFEST, m)
        stale = _drop_temp_files(work)
        if stale:
            log(f"[{stage.name}] removed {len(stale)} temp file(s) of interrupted writes")
        _swap_into_place(work, final)
        write_json_atomic(out / "manifests" / f"{stage.name}.json", m)
        summary.stages[stage.name] = {
            "status": result.status,
            "seconds": m["seconds"],
            "counts": result.counts,
            "failed_units": {u: unit_reason(result.units[u]) for u in result.failed_units},
            "input_hash": h,
        }
        _write_run_json(out, spec, summary)
        msg = f"[{stage.name}] {result.status} in {m['seconds']:.1f}s {result.counts}"
        if result.failed_units:
            msg += f"; FAILED units: {summary.stages[stage.name]['failed_units']}"
        log(msg)
    _write_run_json(out, spec, summary)
    return summary


def _finished_hash(out: Path, stage: str) -> str | None:
    m = read_json(out / stage / MANIFEST)
    return m.get("input_hash") if m else None


def _write_run_json(out: Path, spec: JobSpec, summary: RunSummary) -> None:
    write_json_atomic(
        out / "run.json",
        {
            "name": spec.run.name,
            "output": str(out),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stages": summary.stages,
            "exit_code": summary.exit_code,
        },
    )
