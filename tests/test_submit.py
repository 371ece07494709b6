"""``pbip-engine submit | status | logs | stop`` against a real local 2-node Ray cluster (Jobs API).

The fast tests (address parsing, token lookup, refusals, the shipped spec) need no cluster; the ones
marked ``cluster`` start a head and a worker as separate Ray processes with token authentication.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

import pbip_engine
from pbip_engine import cli_cluster
from pbip_engine.jobs import submit as sm
from pbip_engine.jobs.local_cluster import LocalCluster, free_port
from pbip_engine.jobs.stages import all_stages
from pbip_engine.schemas.spec import load_spec

DEMO = Path(pbip_engine.__file__).parent / "examples" / "demo.yaml"
# What the --wait submission runs after synth: None = every stage the spec enables (training
# included, ~2.5 min on 2 cores); e.g. ["synth", "tile", "embed", "bank"] for a quicker CI.
PIPELINE_STAGES: list[str] | None = None


def write_spec(folder: Path, output: str = "out", slides: int = 2, size: int = 1024, **overrides) -> Path:
    """The demo spec, shrunk: two small synthetic slides, one training epoch per model."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["run"]["output"] = output
    raw["data"]["synthetic"].update(slides=slides, size=size)
    raw["stage1"]["epochs"] = 1
    raw["segmenter"]["epochs"] = 1
    raw.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


# -- no cluster needed ------------------------------------------------------------------------------


def test_normalize_address() -> None:
    assert sm.normalize_address("head:8265") == "http://head:8265"
    assert sm.normalize_address(" http://10.0.0.5:8265/ ") == "http://10.0.0.5:8265"
    assert sm.normalize_address("https://ray.example.org") == "https://ray.example.org"
    for bad in ("", "ray://head:10001"):
        with pytest.raises(sm.SubmitError):
            sm.normalize_address(bad)


def test_local_or_remote_address() -> None:
    assert sm.is_local_address("http://127.0.0.1:8265")
    assert sm.is_local_address("localhost:8265")
    assert not sm.is_local_address("http://10.0.0.5:8265")
    assert not sm.is_local_address("http://ray-head.internal:8265")


def test_token_lookup_follows_ray_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_tok = tmp_path / "tok"
    path_tok.write_text("from-path")
    explicit = tmp_path / "explicit"
    explicit.write_text("  from-flag  \n")
    env = {"HOME": str(home)}
    assert sm.resolve_token(environ=env) == "from-home"
    assert sm.resolve_token(environ={**env, "RAY_AUTH_MODE": "disabled"}) is None
    assert sm.resolve_token(environ={**env, "RAY_AUTH_TOKEN_PATH": str(path_tok)}) == "from-path"
    full = {**env, "RAY_AUTH_TOKEN_PATH": str(path_tok), "RAY_AUTH_TOKEN": "from-env"}
    assert sm.resolve_token(environ=full) == "from-env"
    assert sm.resolve_token(explicit, environ=full) == "from-flag"
    assert sm.resolve_token(environ={"HOME": str(tmp_path / "nohome")}) is None
    with pytest.raises(sm.ClusterAuthError, match="RAY_AUTH_TOKEN_PATH"):
        sm.resolve_token(environ={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(sm.ClusterAuthError, match="empty"):
        sm.resolve_token(tmp_path / "empty", environ={})


def test_local_output_to_remote_cluster_is_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    t0 = time.monotonic()
    res = CliRunner().invoke(cli_cluster.submit, [str(spec), "--address", "http://10.1.2.3:8265"])
    assert res.exit_code == 1
    assert "shared" in res.output and "--allow-local-output" in res.output and "s3://" in res.output
    assert time.monotonic() - t0 < 5  # refused before any connection attempt


def test_uri_output_is_refused_with_the_mount_recipe(tmp_path: Path) -> None:
    # The driver writes the run directory as files from every node: a bucket must be mounted, and
    # refusing here beats a job that fails on the cluster after its upload.
    spec = write_spec(tmp_path, output="s3://bucket/runs/demo")
    with pytest.raises(sm.SubmitError, match=r"s3://bucket/runs/demo.*mount"):
        sm.check_spec_for_cluster(spec, "http://10.1.2.3:8265")
    shared = write_spec(tmp_path, output="/mnt/bucket/runs/demo")
    loaded, warnings = sm.check_spec_for_cluster(shared, "http://10.1.2.3:8265", allow_local_output=True)
    assert loaded.run.output == "/mnt/bucket/runs/demo" and warnings == []


def test_tunnel_to_remote_cluster_gets_remote_checks(tmp_path: Path) -> None:
    raw_slides = {"slides": ["/cluster-only/slides/*.svs"]}
    spec = write_spec(tmp_path, output="/shared/runs/x", data=raw_slides)
    with pytest.raises(sm.SpecError, match="matches no file"):  # a local cluster must see its inputs
        sm.check_spec_for_cluster(spec, "http://127.0.0.1:8265")
    with pytest.raises(sm.SubmitError, match="--allow-local-output"):
        sm.check_spec_for_cluster(spec, "http://127.0.0.1:8265", remote=True)
    _, warnings = sm.check_spec_for_cluster(
        spec, "http://127.0.0.1:8265", allow_local_output=True, remote=True
    )
    assert len(warnings) == 1 and "must exist on the cluster" in warnings[0]


def test_wrong_address_fails_within_seconds(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    res = CliRunner().invoke(cli_cluster.submit, [str(spec), "--address", f"http://127.0.0.1:{port}"])
    assert res.exit_code == 1 and "cannot connect" in res.output and str(port) in res.output
    assert 'Connection refused")' not in res.output  # the reason is cut before the exception's quote
    assert time.monotonic() - t0 < 5
    # An address that never answers: bounded by the connect timeout, not the OS's ~2 minutes.
    t0 = time.monotonic()
    with pytest.raises(sm.ClusterConnectionError, match=r"10\.255\.255\.1"):
        sm.preflight("http://10.255.255.1:8265", None, timeout=2)
    assert time.monotonic() - t0 < 8


def test_an_http_server_that_is_not_ray_is_named(tmp_path: Path) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"<html>nope</html>")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(sm.ClusterConnectionError, match="not a Ray dashboard"):
            sm.preflight(f"http://127.0.0.1:{srv.server_port}", None)
    finally:
        srv.shutdown()


def test_shipped_spec_has_absolute_paths_and_same_meaning(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path / "proj")
    spec = load_spec(spec_path)
    sub = sm.build_submission(spec_path, spec, stages=["synth", "tile"], token="s3cr3t-token")
    try:
        staged = Path(sub.runtime_env["working_dir"])
        assert sub.entrypoint == "pbip-engine run --address auto --stages synth,tile -- spec.yaml"
        shipped = load_spec(staged / "spec.yaml")
        assert shipped.run.output == str((tmp_path / "proj" / "out").resolve())
        for section in ("run", "data", "classes", "tiling", "encoder", "bank", "resources"):
            assert shipped.section_json(section) == spec.section_json(section)
        blob = (
            json.dumps([sub.entrypoint, sub.runtime_env, sub.metadata]) + (staged / "spec.yaml").read_text()
        )
        assert "s3cr3t-token" not in blob
        assert sub.metadata["run_name"] == "demo" and sub.submission_id.startswith("pbip-demo-")
    finally:
        sub.cleanup()
    assert not staged.exists()


def test_working_dir_rules(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    inside = write_spec(wd / "specs", output=str(tmp_path / "abs-out"))
    tok = wd / "auth_token"
    tok.write_text("t")
    sub = sm.build_submission(inside, load_spec(inside), working_dir=wd, token_file=tok)
    assert sub.runtime_env["working_dir"] == str(wd.resolve())
    assert sub.entrypoint.startswith("pbip-engine run --address auto") and sub.entrypoint.endswith(
        " -- specs/spec.yaml"
    )
    assert "/auth_token" in sub.runtime_env["excludes"]  # a token file in the shipped folder stays home
    outside = write_spec(tmp_path / "elsewhere", output=str(tmp_path / "abs-out"))
    with pytest.raises(sm.SubmitError, match="outside --working-dir"):
        sm.build_submission(outside, load_spec(outside), working_dir=wd)
    relative = write_spec(wd / "rel", output="out")
    with pytest.raises(sm.SubmitError, match="relative"):
        sm.build_submission(relative, load_spec(relative), working_dir=wd)


def test_runtime_env_must_not_carry_the_token(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    spec = load_spec(spec_path)
    with pytest.raises(sm.SubmitError, match="RAY_AUTH_TOKEN"):
        sm.build_submission(spec_path, spec, runtime_env={"env_vars": {"RAY_AUTH_TOKEN": "x"}})
    with pytest.raises(sm.SubmitError, match="token"):
        sm.build_submission(spec_path, spec, runtime_env={"env_vars": {"MY_VAR": "tok-123"}}, token="tok-123")


def test_runtime_env_file_is_merged_and_checked(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    env_file = tmp_path / "renv.yaml"
    env_file.write_text("pip: [einops]\nenv_vars: {OMP_NUM_THREADS: '2'}\n")
    renv = sm._load_runtime_env_file(env_file)
    sub = sm.build_submission(spec_path, load_spec(spec_path), runtime_env=renv)
    try:
        assert sub.runtime_env["pip"] == ["einops"] and sub.runtime_env["env_vars"] == {
            "OMP_NUM_THREADS": "2"
        }
        assert Path(sub.runtime_env["working_dir"], "spec.yaml").is_file()
    finally:
        sub.cleanup()
    env_file.write_text("- not a mapping\n")
    with pytest.raises(sm.SubmitError, match="must be a mapping"):
        sm._load_runtime_env_file(env_file)
    with pytest.raises(sm.SubmitError, match="cannot read"):
        sm._load_runtime_env_file(tmp_path / "missing.yaml")
    with pytest.raises(sm.SubmitError, match="local folder"):
        sm.build_submission(spec_path, load_spec(spec_path), runtime_env={"working_dir": "s3://b/x.zip"})


def test_exit_code_of_job_info() -> None:
    assert sm.exit_code_of(SimpleNamespace(status="SUCCEEDED", driver_exit_code=0)) == 0
    assert sm.exit_code_of(SimpleNamespace(status="FAILED", driver_exit_code=2)) == 2  # partial run
    assert sm.exit_code_of(SimpleNamespace(status="FAILED", driver_exit_code=None)) == 1
    assert sm.exit_code_of(SimpleNamespace(status="STOPPED", driver_exit_code=-15)) == 1


# -- against a real local cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=1, head_cpus=1, worker_cpus=1) as c:
        yield c


@pytest.fixture(scope="module")
def submitted(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The demo spec (2 small slides) submitted twice with --wait: synth, then the whole pipeline
    (which must skip the finished synth stage)."""
    tmp = tmp_path_factory.mktemp("submit")
    spec = write_spec(tmp)
    runner = CliRunner()
    base = [str(spec), "--address", cluster.dashboard_url, "--token-file", str(cluster.token_file), "--wait"]
    first = runner.invoke(cli_cluster.submit, [*base, "--stages", "synth"])
    second = runner.invoke(
        cli_cluster.submit, base + (["--stages", ",".join(PIPELINE_STAGES)] if PIPELINE_STAGES else [])
    )
    return SimpleNamespace(spec=spec, out=tmp / "out", first=first, second=second)


def _job_id(result) -> str:
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)  # includes the module's cluster and the whole pipeline (training included)
def test_submit_with_wait_runs_the_whole_pipeline(submitted: SimpleNamespace) -> None:
    assert submitted.first.exit_code == 0, submitted.first.output
    assert submitted.second.exit_code == 0, submitted.second.output[-5000:]
    assert "[tile]" in submitted.second.stdout  # the job's log was streamed
    assert "[synth] up to date" in submitted.second.stdout  # a re-submitted run resumes
    run = json.loads((submitted.out / "run.json").read_text())
    spec = load_spec(submitted.spec)
    expected = PIPELINE_STAGES or [s.name for s in all_stages() if s.enabled(spec)]
    assert len(expected) >= 2 and {n: run["stages"][n]["status"] for n in expected} == dict.fromkeys(
        expected, "done"
    )
    assert sorted(p.stem for p in (submitted.out / "tile" / "tiles").glob("*.parquet")) == [
        "synth_000",
        "synth_001",
    ]
    assert run["stages"]["tile"]["counts"]["slides_done"] == 2


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_token_is_never_shipped_or_printed(cluster: LocalCluster, submitted: SimpleNamespace) -> None:
    token = cluster.token_file.read_text().strip()
    for res in (submitted.first, submitted.second):
        assert token not in res.output
        info = sm.job_info(cluster.dashboard_url, _job_id(res), cluster.token_file)
        shipped = json.dumps([info.entrypoint, info.runtime_env, info.metadata], default=str)
        assert token not in shipped
        assert info.entrypoint.startswith("pbip-engine run --address auto") and info.entrypoint.endswith(
            " -- spec.yaml"
        )
        assert info.metadata["run_name"] == "demo"


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_status_and_logs_commands(cluster: LocalCluster, submitted: SimpleNamespace) -> None:
    job = _job_id(submitted.second)
    common = ["--address", cluster.dashboard_url, "--token-file", str(cluster.token_file)]
    st = CliRunner().invoke(cli_cluster.status, [job, *common])
    assert st.exit_code == 0 and "SUCCEEDED" in st.output
    lg = CliRunner().invoke(cli_cluster.logs, [job, *common])
    assert lg.exit_code == 0 and "[tile]" in lg.output
    missing = CliRunner().invoke(cli_cluster.status, ["pbip-no-such-job", *common])
    assert missing.exit_code == 1 and "no job 'pbip-no-such-job'" in missing.output


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_missing_and_wrong_token_are_named(
    cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "PBIP_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    spec = write_spec(tmp_path)
    res = CliRunner().invoke(cli_cluster.submit, [str(spec), "--address", cluster.dashboard_url])
    assert res.exit_code == 1 and "Unauthorized" in res.output and "--token-file" in res.output
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token-0123456789")
    res = CliRunner().invoke(
        cli_cluster.submit, [str(spec), "--address", cluster.dashboard_url, "--token-file", str(wrong)]
    )
    assert res.exit_code == 1 and "rejected the authentication token" in res.output
    assert "not-the-token-0123456789" not in res.output
    st = CliRunner().invoke(
        cli_cluster.status, ["x", "--address", cluster.dashboard_url, "--token-file", str(wrong)]
    )
    assert st.exit_code == 1 and "rejected" in st.output


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stop_a_running_job(cluster: LocalCluster, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, slides=8, size=4096)  # far longer than the test waits
    common = ["--address", cluster.dashboard_url, "--token-file", str(cluster.token_file)]
    res = CliRunner().invoke(cli_cluster.submit, [str(spec), *common, "--stages", "synth"])
    assert res.exit_code == 0, res.output
    job = _job_id(res)
    stop = CliRunner().invoke(cli_cluster.stop, [job, *common, "--wait", "60"])
    assert stop.exit_code == 0 and "STOPPED" in stop.output
    st = CliRunner().invoke(cli_cluster.status, [job, *common])
    assert st.exit_code == 1 and "STOPPED" in st.output
