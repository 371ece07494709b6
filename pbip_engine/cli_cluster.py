"""``pbip-engine submit | status | logs | stop``: running specs on a Ray cluster via the Jobs API.

Standalone click commands; the main group registers them (``main.add_command(submit)`` ...). The
address can also come from ``RAY_API_SERVER_ADDRESS`` (what ``ray job`` reads).
"""

from __future__ import annotations

import sys
import time

import click

from pbip_engine.schemas.spec import SpecError

ADDRESS_HELP = "the head's dashboard / Jobs API address, e.g. http://HEAD:8265 (env RAY_API_SERVER_ADDRESS)"
TOKEN_HELP = (
    "file holding the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
)


def _address_option(f):
    return click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS", help=ADDRESS_HELP)(f)


def _token_option(f):
    return click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        default=None,
        envvar="PBIP_TOKEN_FILE",
        help=TOKEN_HELP,
    )(f)


def split_names(value: str | None, option: str = "--stages") -> list[str] | None:
    """``--stages tile,embed`` -> ``["tile", "embed"]``; nothing given -> None, which means every stage.

    A value with no name in it (``--stages ,``) is refused: read as "nothing given" it ran every stage.
    """
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise click.UsageError(f"{option}: no stage name in {value!r}; give names like tile,embed")
    return names


def _guard(fn, *args, **kwargs):
    """Run a submit-module call; user errors become one clean message and exit status 1."""
    from pbip_engine.jobs.submit import SubmitError

    try:
        return fn(*args, **kwargs)
    except (SubmitError, SpecError) as e:
        raise click.ClickException(str(e)) from None


@click.command()
@click.argument("spec", type=click.Path())
@_address_option
@click.option("--wait", is_flag=True, help="follow the job's logs and exit with its final status")
@click.option(
    "--runtime-env",
    "runtime_env",
    type=click.Path(dir_okay=False),
    default=None,
    help="extra Ray runtime env (YAML/JSON)",
)
@click.option(
    "--working-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="ship this folder with the job (it must contain SPEC; SPEC's relative paths resolve inside it)",
)
@click.option("--stages", default=None, help="comma-separated stages to run (default: all enabled)")
@click.option("--force", default=None, help="comma-separated stages to redo even if up to date ('all')")
@click.option(
    "--allow-local-output",
    is_flag=True,
    help="run.output is a path on a filesystem shared by every node (same mount point): accept it",
)
@click.option(
    "--remote",
    is_flag=True,
    help="the address is a tunnel / port-forward to a remote cluster: apply the remote-cluster checks",
)
@click.option(
    "--job-id", default=None, help="submission id to use (default: pbip-<run name>-<time>-<random>)"
)
@click.option(
    "--timeout", default=5.0, show_default=True, type=click.FloatRange(0.5), help="connect timeout (s)"
)
@_token_option
def submit(
    spec: str,
    address: str,
    wait: bool,
    runtime_env: str | None,
    working_dir: str | None,
    stages: str | None,
    force: str | None,
    allow_local_output: bool,
    remote: bool,
    job_id: str | None,
    timeout: float,
    token_file: str | None,
) -> None:
    """Submit SPEC to a running Ray cluster (Jobs API); prints the job id.

    The spec is checked here first, then shipped with the job, which runs
    `pbip-engine run SPEC --address auto` on the head. With --wait the job's logs are
    streamed and the exit status is the job's (0 = succeeded).
    """
    from pbip_engine.jobs.submit import submit as do_submit

    res = _guard(
        do_submit,
        spec,
        address,
        wait=wait,
        runtime_env_file=runtime_env,
        working_dir=working_dir,
        stages=split_names(stages),
        force=split_names(force, "--force"),
        allow_local_output=allow_local_output,
        remote=True if remote else None,
        token_file=token_file,
        submission_id=job_id,
        timeout=timeout,
        log=lambda m: click.echo(m, err=True),
        out=click.echo,
    )
    click.echo(res.job_id)
    if wait:
        sys.exit(res.exit_code)


@click.command()
@click.argument("job_id")
@_address_option
@_token_option
def status(job_id: str, address: str, token_file: str | None) -> None:
    """Show the status of a submitted job (exit status 0 only when it succeeded)."""
    from pbip_engine.jobs.submit import exit_code_of, job_info

    info = _guard(job_info, address, job_id, token_file)
    st = str(info.status).split(".")[-1]
    click.echo(f"job:         {job_id}")
    click.echo(f"status:      {st}")
    if info.message:
        click.echo(f"message:     {info.message}")
    click.echo(f"entrypoint:  {info.entrypoint}")
    for label, ms in (("started:", info.start_time), ("ended:", info.end_time)):
        if ms:
            click.echo(f"{label:<12} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    if getattr(info, "driver_exit_code", None) is not None:
        click.echo(f"exit code:   {info.driver_exit_code}")
    if st in ("PENDING", "RUNNING"):
        return
    sys.exit(exit_code_of(info))


@click.command()
@click.argument("job_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="keep streaming until the job ends")
@_token_option
def logs(job_id: str, address: str, follow: bool, token_file: str | None) -> None:
    """Print a job's logs (driver stdout/stderr)."""
    from pbip_engine.jobs import submit as sm

    if not follow:
        click.echo(_guard(sm.job_logs, address, job_id, token_file), nl=False)
        return
    client = _guard(sm.connect, address, token_file)
    final = _guard(sm.follow, client, job_id, click.echo, address=address)
    click.echo(f"job {job_id} {final}", err=True)


@click.command()
@click.argument("job_id")
@_address_option
@click.option(
    "--wait", "wait_s", default=30.0, show_default=True, type=float, help="seconds to wait for it to stop"
)
@_token_option
def stop(job_id: str, address: str, wait_s: float, token_file: str | None) -> None:
    """Stop a running job (the driver gets SIGTERM, then SIGKILL)."""
    from pbip_engine.jobs.submit import stop_job

    st = _guard(stop_job, address, job_id, token_file, wait_s)
    click.echo(f"job {job_id} {st}")
    if st not in ("STOPPED", "SUCCEEDED", "FAILED"):
        sys.exit(1)


COMMANDS = (submit, status, logs, stop)
"""What the main CLI group registers: ``for c in COMMANDS: main.add_command(c)``."""
