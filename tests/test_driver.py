"""The pipeline driver: a run, a re-run that skips, --force, and a stage that raises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pbip_engine.cli import main
from pbip_engine.jobs.driver import run_pipeline
from pbip_engine.jobs.synth import SynthStage
from pbip_engine.schemas.spec import load_spec

SPEC = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 768, "seed": 3}},
    "classes": [
        {"name": "tumour", "color": [200, 40, 40]},
        {"name": "stroma", "color": [240, 130, 190]},
        {"name": "lymphocytes", "color": [60, 60, 200]},
        {"name": "necrosis", "color": [150, 120, 40]},
    ],
}


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(SPEC))
    return p


def _manifest(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


def test_run_rerun_skip_and_force(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    out = Path(spec.run.output)
    logs: list[str] = []
    s1 = run_pipeline(spec, only=["synth"], log=logs.append, progress=False)
    assert s1.exit_code == 0
    m1 = _manifest(out, "synth")
    assert m1["status"] == "done" and m1["counts"]["slides"] == 1
    assert "torch" in m1["versions"] and m1["seconds"] >= 0
    slide = out / "synth" / "slides" / "synth_000.tif"
    assert slide.is_file()
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["stages"]["synth"]["status"] == "done"
    mtime = slide.stat().st_mtime_ns

    logs.clear()
    s2 = run_pipeline(spec, only=["synth"], log=logs.append, progress=False)
    assert s2.stages["synth"].get("skipped") is True
    assert any("up to date" in line for line in logs)
    assert slide.stat().st_mtime_ns == mtime

    s3 = run_pipeline(spec, only=["synth"], force=["synth"], log=logs.append, progress=False)
    assert not s3.stages["synth"].get("skipped")
    assert slide.stat().st_mtime_ns != mtime
    assert not (out / ".work" / "synth").exists()  # the work dir was renamed into place


def test_changed_spec_reruns(spec_path: Path, tmp_path: Path) -> None:
    spec = load_spec(spec_path)
    run_pipeline(spec, only=["synth"], log=lambda s: None, progress=False)
    h1 = _manifest(Path(spec.run.output), "synth")["input_hash"]
    raw = yaml.safe_load(spec_path.read_text())
    raw["data"]["synthetic"]["seed"] = 4
    spec_path.write_text(yaml.safe_dump(raw))
    spec2 = load_spec(spec_path)
    s = run_pipeline(spec2, only=["synth"], log=lambda s: None, progress=False)
    assert not s.stages["synth"].get("skipped")
    assert _manifest(Path(spec2.run.output), "synth")["input_hash"] != h1


def test_stage_that_raises_leaves_no_output_and_a_failed_manifest(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self, ctx):  # writes something first: none of it may appear as output
        (ctx.work_dir / "half.txt").write_text("half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SynthStage, "run", boom)
    spec = load_spec(spec_path)
    out = Path(spec.run.output)
    summary = run_pipeline(spec, log=lambda s: None, progress=False)
    assert summary.exit_code == 1 and summary.failed == ["synth"]
    assert not (out / "synth").exists()
    failed = json.loads((out / "manifests" / "synth.json").read_text())
    assert failed["status"] == "failed" and "disk on fire" in failed["error"]
    assert json.loads((out / "run.json").read_text())["stages"]["synth"]["status"] == "failed"


def test_a_failed_unit_is_reported_with_its_message_not_only_its_reason_code(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slide with a bad annotation showed as {'synth_000': 'labels'}; the file and the cause were only in state/.
    from pbip_engine.jobs.stage import StageResult

    why = "/x/synth_000.geojson: unknown annotation class name(s) ['lymphocytes']"
    units = {"synth_000": {"status": "failed", "reason": "labels", "message": why},
             "synth_001": {"status": "failed", "reason": "unreadable"},
             "synth_002": {"status": "done"}}  # fmt: skip
    monkeypatch.setattr(SynthStage, "run", lambda self, ctx: StageResult(units=units))
    lines: list[str] = []
    spec = load_spec(spec_path)
    summary = run_pipeline(spec, only=["synth"], log=lines.append, progress=False)
    assert summary.stages["synth"]["failed_units"] == {"synth_000": why, "synth_001": "unreadable"}
    run = json.loads((Path(spec.run.output) / "run.json").read_text())
    assert run["stages"]["synth"]["failed_units"]["synth_000"] == why
    assert any(why in line for line in lines), lines


def test_a_stage_error_raised_in_a_ray_worker_is_reported_by_its_own_words(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An embed actor's __init__ that raised showed as "ActorDiedError: The actor died because of an error
    # raised in its creation task, \x1b[36mray::MapWorker(...)" with the real error hidden further down.
    import traceback

    import ray.exceptions

    def boom(self, ctx):
        try:
            raise KeyError("unknown encoder 'nonexistent_net'")
        except KeyError as e:
            task = ray.exceptions.RayTaskError("MapWorker.__init__", traceback.format_exc(), e)
        raise ray.exceptions.ActorDiedError(task)

    monkeypatch.setattr(SynthStage, "run", boom)
    lines: list[str] = []
    spec = load_spec(spec_path)
    summary = run_pipeline(spec, only=["synth"], log=lines.append, progress=False)
    error = summary.stages["synth"]["error"]
    assert (
        error.splitlines()[0] == "KeyError: \"unknown encoder 'nonexistent_net'\" (raised in a Ray worker)"
    ), error
    assert "ActorDiedError" in error and "\x1b[" not in error  # the whole text stays, without colour codes
    assert lines[-1].startswith("[synth] FAILED: KeyError: "), lines


def test_exit_code_counts_only_this_runs_stages(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    out = Path(spec.run.output)
    assert run_pipeline(spec, only=["synth"], log=lambda s: None, progress=False).exit_code == 0
    run = json.loads((out / "run.json").read_text())
    run["stages"]["tile"] = {"status": "failed", "error": "an earlier, interrupted run"}
    (out / "run.json").write_text(json.dumps(run))
    again = run_pipeline(spec, only=["synth"], log=lambda s: None, progress=False)
    assert again.exit_code == 0 and again.failed == []
    assert again.stages["tile"]["status"] == "failed"  # still reported in run.json, not counted


def test_cli_run_exit_codes(spec_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["run", str(spec_path), "--stages", "synth"])
    assert r.exit_code == 0, r.output
    assert "synth" in r.output and "run.json" in r.output
    bad = runner.invoke(main, ["run", str(spec_path), "--stages", "nope"])
    assert bad.exit_code != 0 and "unknown stage" in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stages", ","], "--stages: no stage name in ','"),  # read as "nothing given", it ran every stage
        (["--stages", "synth", "--force", "synthh"], "--force: unknown stage(s) ['synthh']"),  # was ignored
        (["--stages", "synth", "--force", " , "], "--force: no stage name"),
    ],
)
def test_cli_run_refuses_empty_or_unknown_stage_names(spec_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["run", str(spec_path), *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output
    assert not (Path(load_spec(spec_path).run.output) / "synth").exists()  # nothing ran


def test_temp_files_of_interrupted_writes_are_dropped(tmp_path: Path) -> None:
    """Only the atomic writers' ``.pbip-tmp/`` folders are swept: a user's file named like a temp file
    (issue 20 item 2: a slide ``.tmp-scan.svs`` had its outputs deleted) stays."""
    from pbip_engine.jobs.driver import _drop_temp_files

    (tmp_path / "tiles" / ".pbip-tmp").mkdir(parents=True)
    (tmp_path / ".pbip-tmp").mkdir()
    keep = [
        tmp_path / "tiles" / "a.parquet",
        tmp_path / "manifest.json",
        tmp_path / ".hidden-config",
        tmp_path / "tiles" / ".tmp-scan.parquet",
        tmp_path / "state" / ".tmp-scan.json",
    ]
    stale = [
        tmp_path / "tiles" / ".pbip-tmp" / ".a.parquet.x1y2.tmp.parquet",
        tmp_path / ".pbip-tmp" / ".s.json.tmp",
    ]
    for p in keep + stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert sorted(_drop_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert not list(tmp_path.rglob(".pbip-tmp"))
