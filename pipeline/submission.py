"""Sending flowray jobs to a Ray cluster through its job server, and following them to the end.

    url = dashboard_url("127.0.0.1:6379", os.environ)       # a GCS address is looked up
    env = job_environment(os.environ)                        # what the job needs from here
    spec = JobSpec("train", ["--config", "fashion-mnist"], runtime_env(repo_root(), env))
    client = connect(url)
    job_id = submit(client, spec)
    status = follow(client, job_id, sys.stdout, secrets=secret_values(env))

The job runs `python -m jobs.<command> <args>` in a copy of the checkout (Ray's `working_dir`),
with the tracking URI, S3 endpoint and region of the submitting shell as environment variables:

    ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".stack", ...], "env_vars": {...}}' \
        -- python -m jobs.train --config fashion-mnist

Credentials are not forwarded unless asked (`credentials=True`): the cluster keeps a job's
env_vars and the dashboard shows them, so its nodes should have an identity of their own. Without
forwarding, forwarded URLs also lose their `user:password@`. Nothing printed here shows a
credential (`describe`, `follow` mask them). Ray's token auth (RAY_AUTH_MODE=token) is Ray's own;
the token never goes into the job's environment.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from flowmodel.errors import FlowrayError
from pipeline.storage import redact_url

JOB_COMMANDS = ("train", "score", "sample", "prepare")
# Never uploaded with the sources: environments, local state, outputs (Ray also honours .gitignore).
WORKING_DIR_EXCLUDES = (
    ".venv",
    ".stack",
    "flowray-work",
    "demo-work",
    "bench-results",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # JobStatus values after which nothing changes
_CONNECT_TIMEOUT_S = 5.0

_ADDRESS_HINT = (
    "pass --address http://<head>:8265 (the dashboard / job server) or a GCS address <head>:6379, "
    "or set RAY_API_SERVER_ADDRESS / RAY_ADDRESS (local stack: make cluster-up; "
    "source .stack/env.sh)"
)
_AUTH_HINT = (
    "the cluster uses Ray token auth: export RAY_AUTH_MODE=token with the cluster's token in "
    "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN (on the head: ray get-auth-token)"
)


_USAGE = 2  # the exit code of a usage error (jobs.errors, which pipeline does not import)


class SubmitError(FlowrayError, RuntimeError):
    """A submission that cannot go ahead: a runtime failure (exit 1: the cluster unreachable or
    refusing) unless the raiser says the user's input is wrong (2)."""

    exit_code = 1


class JobClient(Protocol):
    """The part of ray.job_submission.JobSubmissionClient used here (tests pass a fake)."""

    def submit_job(self, **kwargs: Any) -> str: ...
    def get_job_status(self, job_id: str) -> Any: ...
    def get_job_info(self, job_id: str) -> Any: ...
    def stop_job(self, job_id: str) -> bool: ...
    def tail_job_logs(self, job_id: str) -> Any: ...


@dataclass(frozen=True)
class JobSpec:
    """One job: `python -m jobs.<command> <args>` with a runtime_env."""

    command: str
    args: Sequence[str]
    runtime_env: dict[str, Any] = field(default_factory=dict)
    submission_id: str | None = None

    def __post_init__(self) -> None:
        if self.command not in JOB_COMMANDS:
            raise SubmitError(
                f"unknown job {self.command!r}: expected one of {', '.join(JOB_COMMANDS)}",
                exit_code=_USAGE,
            )

    @property
    def entrypoint(self) -> str:
        """The shell command the job server runs; each argument quoted as the shell needs."""
        return shlex.join(["python", "-m", f"jobs.{self.command}", *self.args])


def new_submission_id(command: str) -> str:
    """A readable, unique job id: flowray-train-20250101-120000-3fa2c1."""
    return f"flowray-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def repo_root() -> Path | None:
    """The flowray checkout this module runs from (pyproject.toml and jobs/ beside pipeline/), or
    None for an installed copy: then the cluster's image must have flowray installed."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "jobs" / "cli.py").is_file():
        return root
    return None


def runtime_env(working_dir: Path | None, env_vars: Mapping[str, str]) -> dict[str, Any]:
    """Ray runtime_env: the sources as working_dir (minus WORKING_DIR_EXCLUDES) and env_vars."""
    env: dict[str, Any] = {}
    if working_dir is not None:
        if not (working_dir / "jobs").is_dir():
            raise SubmitError(
                f"working dir {working_dir}: expected a flowray checkout (with jobs/), found none",
                hint="pass --working-dir <your flowray checkout>, or --no-working-dir when the "
                "cluster's image has flowray installed",
                exit_code=_USAGE,
            )
        env["working_dir"] = str(working_dir)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def describe(spec: JobSpec, url: str) -> str:
    """What is about to be submitted, secrets masked: printed before submitting."""
    lines = [
        f"submitting {spec.command} to {redact_url(url)}"
        + (f" as {spec.submission_id}" if spec.submission_id else ""),
        f"  entrypoint: {redact_url(spec.entrypoint)}",
    ]
    working_dir = spec.runtime_env.get("working_dir")
    lines.append(
        f"  working_dir: {working_dir} (without {', '.join(spec.runtime_env['excludes'])})"
        if working_dir
        else "  working_dir: none (flowray must be installed on the cluster)"
    )
    env_vars = spec.runtime_env.get("env_vars", {})
    env = redacted(env_vars)
    lines.append(
        "  env: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) if env else "none")
    )
    forwarded = sorted(name for name in env_vars if is_secret(name))
    userinfo = sorted(name for name, value in env_vars.items() if _URL_PASSWORD.search(value))
    lines.append(
        f"  credentials: forwarded {', '.join(forwarded + userinfo)} (values masked here; the "
        "Ray dashboard shows them to anyone who can read it)"
        if forwarded or userinfo
        else "  credentials: none forwarded (the cluster's nodes use their own; "
        "--forward-credentials sends this shell's AWS_*/MLFLOW_TRACKING_* credentials, "
        "which the Ray dashboard then shows)"
    )
    return "\n".join(lines)


def dashboard_url(address: str | None, environ: Mapping[str, str]) -> str:
    """The job server's http(s) URL for `address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS;
    a host:port is a GCS address, whose dashboard is looked up as `ray job submit` does."""
    address = (
        address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or ""
    ).strip()
    if not address:
        raise SubmitError("no Ray cluster address", hint=_ADDRESS_HINT, exit_code=_USAGE)
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    if "://" in address or address in ("auto", "local"):
        raise SubmitError(
            f"address {address!r}: expected http(s)://<head>:<dashboard port> or <head>:<GCS port>",
            hint=_ADDRESS_HINT,
            exit_code=_USAGE,
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SubmitError(
            f"address {address!r}: expected <host>:<port> or an http(s):// URL",
            hint=_ADDRESS_HINT,
            exit_code=_USAGE,
        )
    _check_reachable(host, int(port), f"the Ray GCS at {address}")
    return _lookup_dashboard(address)


def _check_reachable(host: str, port: int, what: str) -> None:
    """Fail fast on a closed port: Ray's own clients retry for a minute or more."""
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise SubmitError(f"cannot reach {what}: {err}", hint=_ADDRESS_HINT) from None


def _lookup_dashboard(gcs_address: str) -> str:
    # Ray's client asks the GCS where the dashboard listens; get_address() is the URL it found.
    what = f"the Ray GCS at {gcs_address}"
    failed = f"cannot find the job server of the Ray cluster at {gcs_address}"
    return _client(gcs_address, what, failed).get_address().rstrip("/")


def _client(address: str, what: str, failed: str) -> Any:
    """A JobSubmissionClient for `address`; SubmitError when it does not answer or refuses."""
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_address_variables():
            return JobSubmissionClient(address)
    except Exception as err:  # Ray raises ValueError, ConnectionError or its own auth errors
        if _is_auth_error(err):
            raise SubmitError(
                f"{what} refused the request: {_first_line(err)}", hint=_AUTH_HINT
            ) from None
        raise SubmitError(f"{failed}: {_first_line(err)}", hint=_ADDRESS_HINT) from None


def _is_auth_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "authentication" in text or "auth token" in text or "unauthenticated" in text


@contextmanager
def _without_address_variables() -> Iterator[None]:
    """Ray's JobSubmissionClient prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address it
    is given; hide them so the URL chosen by `dashboard_url` is the one used."""
    saved = {
        name: os.environ.pop(name)
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
        if name in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(url: str) -> JobClient:
    """A client of the job server at `url`; SubmitError when it does not answer or refuses."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    what = f"the Ray job server at {url}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    _check_reachable(parts.hostname or "", port, what)
    return _client(url, what, f"cannot use {what}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def submit(
    client: JobClient,
    spec: JobSpec,
    agent_wait_s: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Submit the job; returns its id. "No available agent" (a fresh cluster whose job agent has
    not registered yet) is retried with backoff up to `agent_wait_s`; other refusals raise."""
    waited, delay = 0.0, 1.0
    while True:
        try:
            return client.submit_job(
                entrypoint=spec.entrypoint,
                runtime_env=spec.runtime_env or None,
                submission_id=spec.submission_id,
                metadata={"flowray_command": spec.command},
            )
        except Exception as err:
            if "No available agent" not in str(err):  # else: a fresh cluster's agent not up yet
                if _is_auth_error(err):
                    raise SubmitError(
                        f"the Ray job server refused the job: {_first_line(err)}", hint=_AUTH_HINT
                    ) from None
                raise SubmitError(
                    f"the Ray job server did not accept the job: {_first_line(err)}",
                    hint="check the cluster's dashboard log (dashboard.log on the head node)",
                ) from None
            if waited >= agent_wait_s:
                raise SubmitError(
                    f"the Ray job server has no job agent after {waited:.0f} s: {_first_line(err)}",
                    hint="the head node's dashboard agent did not start: see dashboard_agent.log "
                    "on the head node, or restart the cluster",
                ) from None
        sleep(delay)
        waited, delay = waited + delay, min(delay * 2, 8.0)


def _wait_for_end(client: JobClient, job_id: str, poll_s: float, wait_s: float = math.inf) -> str:
    """The job's status name once it is TERMINAL, or when `wait_s` have passed."""
    deadline = time.monotonic() + wait_s
    while True:
        status = client.get_job_status(job_id)
        name = str(getattr(status, "value", status))  # JobStatus is an enum (a str subclass)
        if name in TERMINAL or time.monotonic() >= deadline:
            return name
        time.sleep(poll_s)


def follow(
    client: JobClient,
    job_id: str,
    out: TextIO,
    secrets: Sequence[str] = (),
    poll_s: float = 2.0,
) -> str:
    """Stream the job's logs to `out` (secret values masked) until it ends; return its final
    status name. Falls back to polling the status when the log stream breaks."""
    try:
        asyncio.run(_tail(client, job_id, out, secrets))
    except Exception as err:
        # The log websocket closed early (job server restarted, proxy timeout): keep waiting.
        out.write(f"[flowray submit] log stream interrupted ({_first_line(err)}); polling status\n")
    return _wait_for_end(client, job_id, poll_s)


async def _tail(client: JobClient, job_id: str, out: TextIO, secrets: Sequence[str]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(mask(chunk, secrets))
        out.flush()


def _job_info(client: JobClient, job_id: str, name: str) -> Any:
    """One field of the job's info; None when the job server gives none (a nicety: the status
    is what matters)."""
    try:
        return getattr(client.get_job_info(job_id), name, None)
    except Exception:
        return None


def final_message(client: JobClient, job_id: str, secrets: Sequence[str] = ()) -> str:
    """The job server's one-line reason for a job's end ('' when none), secrets masked."""
    message = (_job_info(client, job_id, "message") or "").strip()
    return mask(message.splitlines()[0], secrets) if message else ""


def job_exit_code(client: JobClient, job_id: str, status: str) -> int:
    """The submitting shell's exit code for a job that ended with `status`: 0 when it SUCCEEDED,
    else the driver's own exit code when Ray reports a positive one (3: items left out), else 1."""
    if status == "SUCCEEDED":
        return 0
    code = _job_info(client, job_id, "driver_exit_code")
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256:
        return code
    return 1  # a runtime failure (jobs.errors.EXIT_FAILURE)


def stop(client: JobClient, job_id: str, wait_s: float = 60.0, poll_s: float = 1.0) -> str:
    """Ask the job server to stop the job and wait (up to wait_s) for it to end; return its status."""
    client.stop_job(job_id)
    return _wait_for_end(client, job_id, poll_s, wait_s)


FORWARDED_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# Copied too only with credentials=True; never printed.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Variable names whose values are secrets, besides CREDENTIAL_VARIABLES (for --env KEY=VALUE).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY")
# user:password@ in a URL (a tracking URI with basic auth, say).
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)@")
MASK = "***"


def job_environment(
    environ: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    credentials: bool = False,
) -> dict[str, str]:
    """The env_vars a job gets: FORWARDED_VARIABLES (and CREDENTIAL_VARIABLES when `credentials`,
    else URLs without `user:password@`) set in `environ`, then `extra`. A region is set under
    both AWS_REGION and AWS_DEFAULT_REGION (boto3 reads one, other AWS SDKs the other)."""
    names = FORWARDED_VARIABLES + (CREDENTIAL_VARIABLES if credentials else ())
    env = {name: environ[name] for name in names if environ.get(name)}
    if not credentials:
        env = {name: redact_url(value) for name, value in env.items()}
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        env.setdefault("AWS_REGION", region)
        env.setdefault("AWS_DEFAULT_REGION", region)
    env.update(extra or {})
    return env


def is_secret(name: str) -> bool:
    return name in CREDENTIAL_VARIABLES or bool(_SECRET_NAME.search(name.upper()))


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Values to mask wherever they appear: secret variables' values and passwords in URLs, 4
    characters or longer (shorter ones would mask half the log), longest first."""
    values = {value for name, value in env.items() if is_secret(name)}
    values |= {match.group(2) for value in env.values() for match in _URL_PASSWORD.finditer(value)}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redacted(env: Mapping[str, str]) -> dict[str, str]:
    """env for printing: secret variables' values ***, URLs without `user:password@`."""
    return {name: MASK if is_secret(name) else redact_url(value) for name, value in env.items()}


def mask(text: str, secrets_: Sequence[str]) -> str:
    """text with URLs' `user:password@` stripped and each of `secrets_` replaced by ***."""
    text = redact_url(text)
    for value in secrets_:
        text = text.replace(value, MASK)
    return text
