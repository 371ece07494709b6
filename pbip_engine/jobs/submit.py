"""Submitting a job spec to a running Ray cluster through the Ray Jobs API.

``pbip-engine submit`` checks the spec here first (a bad key should fail on the laptop, not after a
cluster spun up), ships it in the job's runtime env, and starts ``pbip-engine run <spec> --address
auto`` on the head. The checks that matter for clusters:

* **outputs on shared storage**: stages checkpoint into ``run.output``; on a remote cluster a path
  on the submitting machine means nothing, so a local path is refused unless the user says it is a
  shared filesystem mounted at the same place on every node (``allow_local_output``);
* **authentication**: Ray ≥ 2.52 token auth. The token is read from ``--token-file``,
  ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (Ray's own order) and only
  ever sent as an HTTP header: it is never printed, logged, or put in the runtime env, entrypoint or
  metadata (the cluster's nodes already hold it);
* **fast failure**: every HTTP request has a connect timeout, so a wrong address fails in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from pbip_engine.schemas.spec import (
    JobSpec,
    SpecError,
    check_inputs,
    check_output,
    load_spec,
    yaml_error_line,
)

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0
PREFLIGHT_READ_S = 30.0
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class SubmitError(RuntimeError):
    """A submission problem, phrased for the user (what is wrong and what to do)."""


class ClusterConnectionError(SubmitError):
    """The address does not answer, or is not a Ray dashboard."""


class ClusterAuthError(SubmitError):
    """The cluster wants a token and got none, or a wrong one."""


# -- addresses and tokens ---------------------------------------------------------------------------


def normalize_address(address: str) -> str:
    """``HEAD:8265`` or ``http://HEAD:8265/`` → ``http://HEAD:8265`` (the Jobs API base URL)."""
    address = address.strip().rstrip("/")
    if not address:
        raise SubmitError("--address is empty; give the head's dashboard URL, e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    try:
        u = urlparse(address)
        _ = u.hostname, u.port  # both parse lazily and raise on a malformed host or port
    except ValueError as e:
        raise SubmitError(f"--address {address!r} is not a valid URL ({e})") from None
    if u.scheme not in ("http", "https"):
        raise SubmitError(
            f"--address {address!r}: the Jobs API is HTTP(S) on the dashboard port (http://HEAD:8265), "
            "not a GCS address (HEAD:6379) or ray:// client address"
        )
    if not u.hostname:
        raise SubmitError(f"--address {address!r} has no host name")
    return address


def is_local_address(address: str) -> bool:
    """True for a head on this machine (127.0.0.1 / localhost): outputs may then be local paths."""
    host = urlparse(normalize_address(address)).hostname or ""
    return host.lower() in LOCAL_HOSTS


def resolve_token(
    token_file: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The Ray auth token, from ``token_file`` or Ray's own sources; ``None`` when there is none.

    Same precedence as Ray: ``RAY_AUTH_TOKEN`` then ``RAY_AUTH_TOKEN_PATH`` then
    ``~/.ray/auth_token``; an explicit ``token_file`` beats them all. ``RAY_AUTH_MODE=disabled``
    skips the default file (but not a token the user named explicitly).
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        return _read_token(Path(token_file), "--token-file")
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser(), "RAY_AUTH_TOKEN_PATH")
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    default = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if default.is_file():
        return _read_token(default, "~/.ray/auth_token")
    return None


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ClusterAuthError(f"{what}: cannot read the token file {str(path)!r}: {e.strerror}") from None
    if not token:
        raise ClusterAuthError(f"{what}: the token file {str(path)!r} is empty")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_error(status: int, address: str, had_token: bool) -> ClusterAuthError:
    if status == 401 or not had_token:
        return ClusterAuthError(
            f"{address}: Unauthorized: the cluster uses token authentication and no token was sent. "
            "Give the cluster's token with --token-file FILE, or set RAY_AUTH_TOKEN_PATH (a file) or "
            "RAY_AUTH_TOKEN, or put it in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)."
        )
    return ClusterAuthError(
        f"{address}: Forbidden: the cluster rejected the authentication token (wrong token, or a token "
        "of another cluster). Check --token-file / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token."
    )


def preflight(address: str, token: str | None, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """One GET to ``/api/version``, bounded by ``timeout``: the Ray version, or a clear error.

    Done before ``JobSubmissionClient`` (whose requests have no timeout at all) so that an unroutable
    host or a missing token is reported in seconds and in words.
    """
    import requests

    url = normalize_address(address)
    try:
        # Connect fast-fails; a live but busy dashboard gets longer to answer.
        r = requests.get(
            url + "/api/version", headers=auth_headers(token), timeout=(timeout, PREFLIGHT_READ_S)
        )
    except requests.exceptions.ConnectTimeout:
        raise ClusterConnectionError(
            f"{url}: no answer within {timeout:.0f}s. Is the address right and the head running? The "
            "dashboard (port 8265) should not be open to the internet: reach it through an SSH tunnel "
            "(ssh -L 8265:localhost:8265 HEAD) or `kubectl port-forward svc/<cluster>-head-svc 8265`."
        ) from None
    except requests.exceptions.ConnectionError as e:
        reason = _short_reason(e)
        raise ClusterConnectionError(
            f"{url}: cannot connect ({reason}). Is a Ray head with the dashboard running there? "
            "(`ray start --head --include-dashboard=true`; the Jobs API is on the dashboard port, 8265 by default)"
        ) from None
    except requests.exceptions.Timeout:
        raise ClusterConnectionError(
            f"{url}: connected, but no reply within {PREFLIGHT_READ_S:.0f}s"
        ) from None
    except requests.exceptions.RequestException as e:
        raise ClusterConnectionError(f"{url}: request failed: {_short_reason(e)}") from None
    if r.status_code in (401, 403):
        raise _auth_error(r.status_code, url, token is not None)
    try:
        version = r.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ClusterConnectionError(
            f"{url}: answered HTTP {r.status_code} but is not a Ray dashboard (no /api/version); "
            "give the dashboard address, http://HEAD:8265"
        ) from None
    return str(version)


def _short_reason(e: Exception) -> str:
    text = str(e)
    for pat in (r"\[Errno -?\d+\] [^'\")\]]+", r"Connection refused", r"Name or service not known"):
        m = re.search(pat, text)
        if m:
            return m.group(0)
    return text[:200]


def connect(
    address: str, token_file: str | os.PathLike[str] | None = None, timeout: float = CONNECT_TIMEOUT_S
):
    """A ``JobSubmissionClient`` for ``address``, after a bounded preflight (see :func:`preflight`)."""
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    token = resolve_token(token_file)
    preflight(url, token, timeout)

    class _Client(JobSubmissionClient):
        """Every request bounded in time; the SDK itself sets no timeout."""

        def _do_request(self, method, endpoint, **kwargs):  # type: ignore[override]
            kwargs.setdefault("timeout", (timeout, READ_TIMEOUT_S))
            return super()._do_request(method, endpoint, **kwargs)

    try:
        return _Client(url, headers=auth_headers(token))
    except ConnectionError as e:
        raise ClusterConnectionError(f"{url}: {e}") from None


def _sdk_call(fn: Callable[[], Any], address: str, job_id: str | None = None) -> Any:
    """Run one SDK call, turning its errors into SubmitError subclasses with the job id in them."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as e:
        raise ClusterAuthError(f"{address}: {str(e).splitlines()[0]}") from None
    except requests.exceptions.Timeout:
        raise ClusterConnectionError(f"{address}: the Jobs API stopped answering (timeout)") from None
    except (requests.exceptions.ConnectionError, ConnectionError) as e:
        raise ClusterConnectionError(f"{address}: connection lost ({_short_reason(e)})") from None
    except RuntimeError as e:
        if job_id and ("404" in str(e) or "does not exist" in str(e)):
            raise SubmitError(f"{address}: no job {job_id!r} on this cluster") from None
        raise SubmitError(f"{address}: {e}") from None


# -- building the submission --------------------------------------------------------------------------


@dataclass
class Submission:
    """What goes to the Jobs API; ``cleanup()`` removes the staging folder once submitted."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    warnings: list[str] = field(default_factory=list)
    _staging: Path | None = None

    def cleanup(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def check_spec_for_cluster(
    spec_path: str | os.PathLike[str],
    address: str,
    allow_local_output: bool = False,
    remote: bool | None = None,
) -> tuple[JobSpec, list[str]]:
    """Validate the spec locally and decide whether it can run on the cluster at ``address``.

    Returns the spec and warnings. A URI output is refused (the run directory is written as files from
    every node: mount the bucket). A local output path with a remote cluster is refused unless
    ``allow_local_output``; inputs missing here are errors for a local cluster and warnings for a
    remote one (they may exist only on the cluster's shared storage). ``remote=True`` says that a
    localhost address is a tunnel or port-forward to a remote cluster.
    """
    spec = load_spec(spec_path)
    check_output(spec)
    local = is_local_address(address) if remote is None else not remote
    warnings: list[str] = []
    if spec.run.is_uri:
        raise SubmitError(
            f"{spec_path}: run.output {spec.run.output!r} is a URI. Every stage's workers write into the run "
            "directory as files, so it must be a filesystem path that every node sees: mount the bucket at "
            "the same path on every node (mountpoint-s3, gcsfuse, s3fs; or NFS/EFS/Filestore) and give that "
            "path with --allow-local-output. pyarrow.fs URIs as run.output are not supported yet."
        )
    if not local and not allow_local_output:
        host = urlparse(normalize_address(address)).hostname
        raise SubmitError(
            f"{spec_path}: run.output is a local path ({spec.run.output}) but the cluster at {host} is "
            "remote. Stages write checkpoints and outputs from the cluster's nodes and resume from them, "
            "so run.output must be shared storage: a filesystem mounted at the same path on every node "
            "(NFS/EFS/Filestore, or a bucket such as s3://... mounted with mountpoint-s3/gcsfuse) — then "
            "pass --allow-local-output."
        )
    try:
        check_inputs(spec)
    except SpecError as e:
        if local:
            raise
        warnings.append(f"{e} here; it must exist on the cluster")
    return spec, warnings


def _load_runtime_env_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise SubmitError(f"--runtime-env {str(p)!r}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"--runtime-env {str(p)!r}: not valid YAML/JSON: {yaml_error_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {str(p)!r}: must be a mapping, got {type(data).__name__}")
    return data


def _check_no_secret(runtime_env: Mapping[str, Any], token: str | None) -> None:
    env_vars = runtime_env.get("env_vars") or {}
    bad = sorted(k for k in env_vars if k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if bad:
        raise SubmitError(
            f"the runtime env sets {bad}: the cluster's nodes already hold the token; shipping it in "
            "the runtime env would expose it in the job's metadata and the dashboard. Remove it."
        )
    if token and token in json.dumps(runtime_env, default=str):
        raise SubmitError(
            "the runtime env contains the Ray auth token; remove it (it would be visible to anyone reading the job)"
        )


def build_submission(
    spec_path: str | os.PathLike[str],
    spec: JobSpec,
    *,
    working_dir: str | os.PathLike[str] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    stages: Sequence[str] | None = None,
    force: Sequence[str] | None = None,
    submission_id: str | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
) -> Submission:
    """Entrypoint, runtime env and metadata for ``spec`` (the spec travels in the runtime env).

    Without ``working_dir`` a copy of the spec with every path made absolute is shipped alone (paths
    must be valid on the cluster: shared storage). With ``working_dir`` the folder is shipped as is,
    the spec must lie inside it, and its relative paths keep meaning "inside this folder"; the output
    must then be absolute or a URI, since Ray unpacks the folder into a temporary directory.
    """
    renv = dict(runtime_env or {})
    _check_no_secret(renv, token)
    if "working_dir" in renv:
        if working_dir is not None:
            raise SubmitError(
                "give the working dir once: --working-dir or working_dir in --runtime-env, not both"
            )
        working_dir = renv.pop("working_dir")
        if not isinstance(working_dir, str) or "://" in working_dir:
            raise SubmitError(
                f"runtime env working_dir {working_dir!r}: the spec is shipped inside the working dir, "
                "so it must be a local folder (use --working-dir DIR)"
            )
    spec_path = Path(spec_path).resolve()
    staging: Path | None = None
    if working_dir is not None:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise SubmitError(f"--working-dir {str(wd)!r} is not a folder")
        try:
            rel = spec_path.relative_to(wd)
        except ValueError:
            raise SubmitError(
                f"{spec_path} is outside --working-dir {wd}: put the spec inside the folder you ship "
                "(its relative paths are then resolved inside it on the cluster), or drop --working-dir"
            ) from None
        raw = yaml.safe_load(spec_path.read_text()) or {}
        out = str((raw.get("run") or {}).get("output", ""))
        if out and not spec.run.is_uri and not Path(out).expanduser().is_absolute():
            raise SubmitError(
                f"{spec_path}: run.output {out!r} is relative; with --working-dir it would resolve inside "
                "Ray's temporary copy of the folder on the cluster and be lost. Give an absolute path on "
                "shared storage or a URI."
            )
        renv["working_dir"] = str(wd)
        spec_in_env = rel.as_posix()
        if token_file is not None:
            try:
                tok_rel = Path(token_file).resolve().relative_to(wd)
                renv["excludes"] = [*renv.get("excludes", []), "/" + tok_rel.as_posix()]
            except ValueError:
                pass
    else:
        staging = Path(tempfile.mkdtemp(prefix="pbip-submit-"))
        spec_in_env = spec_path.name
        resolved = spec.model_dump(mode="json")
        (staging / spec_in_env).write_text(
            f"# {spec_path} as submitted by pbip-engine, every path made absolute\n"
            + yaml.safe_dump(resolved, sort_keys=False)
        )
        renv["working_dir"] = str(staging)

    cmd = ["pbip-engine", "run", "--address", "auto"]
    if stages:
        cmd += ["--stages", ",".join(stages)]
    if force:
        cmd += ["--force", ",".join(force)]
    cmd += ["--", spec_in_env]  # after "--": a spec named "-x.yaml" is not taken for an option
    from pbip_engine import __version__

    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", spec.run.name).strip("-")[:40] or "run"
    sid = submission_id or f"pbip-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    metadata = {
        "pbip_engine_version": __version__,
        "spec": spec_in_env,
        "run_name": spec.run.name,
        "output": spec.run.output,
    }
    return Submission(
        entrypoint=shlex.join(cmd),
        runtime_env=renv,
        metadata=metadata,
        submission_id=sid,
        _staging=staging,
    )


# -- submit, follow, status -----------------------------------------------------------------------------


@dataclass
class SubmitResult:
    job_id: str
    status: str | None = None  # final status with wait=True
    exit_code: int | None = None


def submit(
    spec_path: str | os.PathLike[str],
    address: str,
    *,
    wait: bool = False,
    runtime_env_file: str | os.PathLike[str] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    stages: Sequence[str] | None = None,
    force: Sequence[str] | None = None,
    allow_local_output: bool = False,
    remote: bool | None = None,
    token_file: str | os.PathLike[str] | None = None,
    submission_id: str | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    log: Callable[[str], None] = print,
    out: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Validate, submit, and optionally follow one job; ``log`` gets messages, ``out`` the job's logs."""
    address = normalize_address(address)
    spec, warnings = check_spec_for_cluster(spec_path, address, allow_local_output, remote)
    for w in warnings:
        log(f"warning: {w}")
    token = resolve_token(token_file)
    sub = build_submission(
        spec_path,
        spec,
        working_dir=working_dir,
        runtime_env=_load_runtime_env_file(runtime_env_file),
        stages=stages,
        force=force,
        submission_id=submission_id,
        token=token,
        token_file=token_file,
    )
    try:
        client = connect(address, token_file, timeout)
        job_id = _sdk_call(
            lambda: client.submit_job(
                entrypoint=sub.entrypoint,
                runtime_env=sub.runtime_env,
                metadata=sub.metadata,
                submission_id=sub.submission_id,
            ),
            address,
        )
    finally:
        sub.cleanup()
    log(f"submitted job {job_id} to {address}")
    log(f"  entrypoint: {sub.entrypoint}")
    if not wait:
        log(f"  follow it with: pbip-engine logs {job_id} --address {address} --follow")
        return SubmitResult(job_id)
    try:
        status = follow(client, job_id, out or log, address=address)
    except KeyboardInterrupt:
        log(f"stopped following; job {job_id} keeps running (pbip-engine stop {job_id} --address {address})")
        return SubmitResult(job_id, None, 130)
    info = _sdk_call(lambda: client.get_job_info(job_id), address, job_id)
    code = exit_code_of(info)
    log(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
    return SubmitResult(job_id, status, code)


def follow(
    client: Any, job_id: str, out: Callable[[str], None], address: str = "", poll_s: float = 1.0
) -> str:
    """Stream the job's logs until it ends (websocket tail; polling if that breaks); final status."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out(chunk.rstrip("\n"))

    try:
        asyncio.run(_tail())
    except Exception as e:  # e.g. a proxy that drops websockets: fall back to polling
        out(f"(log stream interrupted: {type(e).__name__}; polling status)")
    while True:
        status = str(_sdk_call(lambda: client.get_job_status(job_id), address, job_id))
        status = status.split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def exit_code_of(info: Any) -> int:
    """0 when the job succeeded; else the driver's own exit code when known (2 = some slides failed), else 1."""
    status = str(info.status).split(".")[-1]
    driver = getattr(info, "driver_exit_code", None)
    if status == "SUCCEEDED":
        return 0
    if isinstance(driver, int) and driver not in (0,) and 0 < driver < 128:
        return driver
    return 1


def job_info(address: str, job_id: str, token_file: str | os.PathLike[str] | None = None) -> Any:
    client = connect(address, token_file)
    return _sdk_call(lambda: client.get_job_info(job_id), normalize_address(address), job_id)


def job_logs(address: str, job_id: str, token_file: str | os.PathLike[str] | None = None) -> str:
    client = connect(address, token_file)
    return _sdk_call(lambda: client.get_job_logs(job_id), normalize_address(address), job_id)


def stop_job(
    address: str, job_id: str, token_file: str | os.PathLike[str] | None = None, wait_s: float = 0.0
) -> str:
    """Ask the cluster to stop the job; with ``wait_s`` > 0, wait that long for a terminal status."""
    url = normalize_address(address)
    client = connect(url, token_file)
    _sdk_call(lambda: client.stop_job(job_id), url, job_id)
    deadline = time.monotonic() + wait_s
    while True:
        status = str(_sdk_call(lambda: client.get_job_status(job_id), url, job_id)).split(".")[-1]
        if status in TERMINAL or time.monotonic() >= deadline:
            return status
        time.sleep(0.5)
