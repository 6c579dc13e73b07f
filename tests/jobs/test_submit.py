"""`flowray submit` without a cluster: the job it builds, what travels with it, what it prints
(never a credential), how it finds the job server, how it ends, and its one-line errors."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

import pipeline.submission as submission
from jobs.submit import build_parser, build_spec, main
from pipeline.submission import (
    JobSpec,
    SubmitError,
    dashboard_url,
    follow,
    job_environment,
    redacted,
    repo_root,
    runtime_env,
    secret_values,
)

SECRET = "s3cr3t-value-never-printed"
STACK_ENV = {
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_DEFAULT_REGION": "eu-west-1",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "RAY_ADDRESS": "127.0.0.1:6379",
    "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8265",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": "ray-token-never-forwarded",
    "HOME": "/home/someone",
}


@pytest.fixture
def stack_env(monkeypatch) -> dict[str, str]:
    for name in list(submission.FORWARDED_VARIABLES + submission.CREDENTIAL_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in STACK_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(STACK_ENV)


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on loopback that accepts connections (and answers nothing)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the job ----------------------------------------------------------------------------------------
def test_entrypoint_runs_the_job_module_with_each_argument_quoted():
    assert JobSpec("train", ["--config", "fashion-mnist", "--set", "run.name=a b"]).entrypoint == (
        "python -m jobs.train --config fashion-mnist --set 'run.name=a b'"
    )
    assert JobSpec("score", ["--input", "s3://b/x;rm -rf /"]).entrypoint == (
        "python -m jobs.score --input 's3://b/x;rm -rf /'"
    )


def test_options_go_before_the_job_and_everything_after_it_goes_to_the_job():
    args = build_parser().parse_args(
        ["--no-wait", "--env", "A=1=2", "sample", "--n", "8", "--address", "x", "--no-wait"]
    )
    assert args.job == "sample" and args.no_wait and args.address is None
    assert args.env == [("A", "1=2")]
    # `--n` is sample's option, not an abbreviation of --no-wait; the job's own --address stays its.
    assert args.job_args == ["--n", "8", "--address", "x", "--no-wait"]
    assert build_parser().parse_args(["train", "--", "--help"]).job_args == ["--help"]


@pytest.mark.parametrize("argv", [["bench"], [], ["--env", "NOEQUALS", "train"]])
def test_unknown_jobs_and_malformed_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_unknown_job_in_a_spec_names_the_choices():
    with pytest.raises(SubmitError, match="expected one of train, score, sample, prepare"):
        JobSpec("bench", [])


# -- what travels with it ---------------------------------------------------------------------------
def test_job_environment_carries_tracking_s3_region_and_credentials_only_when_asked(stack_env):
    env = job_environment(stack_env, credentials=True)
    assert env == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-west-1",  # mirrored: boto3 reads one, other SDKs the other
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    # Ray's token and addresses belong to the submitting side; the cluster has its own.
    assert not any(name.startswith("RAY_") for name in env)


def test_by_default_no_credential_is_forwarded_not_even_inside_a_url(stack_env):
    environ = stack_env | {"MLFLOW_TRACKING_URI": "https://alice:pa55word@mlflow.example.com:5000"}
    environ |= {"MLFLOW_TRACKING_PASSWORD": "pa55word", "AWS_SESSION_TOKEN": "tok-123456"}
    env = job_environment(environ, extra={"FLOWRAY_X": "1"})
    assert env == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com:5000",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-west-1",
        "FLOWRAY_X": "1",
    }


def test_runtime_env_ships_the_checkout_without_local_state():
    root = repo_root()
    assert root is not None and (root / "jobs" / "submit.py").is_file()
    env = runtime_env(root, {"A": "1"})
    assert env["working_dir"] == str(root)
    for excluded in (".venv", ".stack", "flowray-work", "bench-results", ".git"):
        assert excluded in env["excludes"]
    assert env["env_vars"] == {"A": "1"}
    assert "working_dir" not in runtime_env(None, {})


def test_a_working_dir_without_jobs_is_refused_with_a_hint(tmp_path):
    with pytest.raises(SubmitError, match="expected a flowray checkout") as error:
        runtime_env(tmp_path, {})
    assert "--no-working-dir" in error.value.hint


def test_redaction_masks_secret_variables_and_url_passwords():
    env = {
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "session-token-value",
        "MLFLOW_TRACKING_URI": "https://alice:pa55word@mlflow.example.com",
        "MY_API_KEY": "key-from-env-flag",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    shown = redacted(env)
    assert shown["AWS_SECRET_ACCESS_KEY"] == shown["AWS_SESSION_TOKEN"] == "***"
    assert shown["MY_API_KEY"] == "***"
    assert shown["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"  # user:password@ gone
    assert shown["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert set(secret_values(env)) == {
        SECRET,
        "session-token-value",
        "pa55word",
        "key-from-env-flag",
    }


def test_dry_run_says_no_credentials_are_forwarded_by_default(stack_env, capsys):
    code = main(["--dry-run", "train", "--set", "max_steps=5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "entrypoint: python -m jobs.train --set max_steps=5" in out
    assert "credentials: none forwarded (the cluster's nodes use their own; " in out
    assert "AWS_SECRET_ACCESS_KEY" not in out and "AWS_ACCESS_KEY_ID" not in out


def test_dry_run_with_forwarded_credentials_names_them_and_masks_them(stack_env, capsys):
    argv = ["--dry-run", "--forward-credentials", "--env", "MY_TOKEN=tok-123456", "train"]
    code = main([*argv, "--set", "mlflow.tracking_uri=https://bob:hunter22@mlflow.example.com"])
    out = capsys.readouterr().out
    assert code == 0
    assert "to http://127.0.0.1:8265" in out
    assert "AWS_SECRET_ACCESS_KEY=***" in out and "MY_TOKEN=***" in out
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in out
    assert "credentials: forwarded AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MY_TOKEN (" in out
    assert "mlflow.tracking_uri=https://mlflow.example.com" in out  # the entrypoint, as printed
    for secret in (SECRET, "tok-123456", "AKIAEXAMPLEKEY", "ray-token-never-forwarded", "hunter22"):
        assert secret not in out


def test_build_spec_honours_no_working_dir_and_gives_a_readable_job_id(stack_env):
    args = build_parser().parse_args(["--no-working-dir", "score"])
    spec = build_spec(args, stack_env)
    assert "working_dir" not in spec.runtime_env
    assert "AWS_SECRET_ACCESS_KEY" not in spec.runtime_env["env_vars"]
    assert spec.submission_id.startswith("flowray-score-")


# -- finding the job server -------------------------------------------------------------------------
def test_an_http_address_is_used_as_is_and_explicit_beats_the_environment(stack_env):
    assert dashboard_url("http://head:8265/", stack_env) == "http://head:8265"
    assert dashboard_url(None, stack_env) == "http://127.0.0.1:8265"  # RAY_API_SERVER_ADDRESS
    assert dashboard_url("https://ray.example.com", stack_env) == "https://ray.example.com"


def test_a_gcs_address_is_looked_up_in_the_gcs(monkeypatch, listening_port):
    seen = []
    monkeypatch.setattr(
        submission, "_lookup_dashboard", lambda gcs: seen.append(gcs) or "http://10.0.0.1:8265"
    )
    address = f"127.0.0.1:{listening_port}"
    assert dashboard_url(None, {"RAY_ADDRESS": address}) == "http://10.0.0.1:8265"
    assert seen == [address]


def test_a_gcs_address_is_resolved_by_rays_public_client(stack_env, monkeypatch):
    """The lookup goes through ray.job_submission.JobSubmissionClient (no ray.dashboard import),
    which is given the GCS address itself, with RAY_ADDRESS / RAY_API_SERVER_ADDRESS hidden (it
    would prefer them over its argument)."""
    import os

    import ray.job_submission

    built = []

    class Client:
        def __init__(self, address: str) -> None:
            built.append((address, os.environ.get("RAY_ADDRESS")))

        def get_address(self) -> str:
            return "http://10.0.0.7:8265/"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    assert submission._lookup_dashboard("10.0.0.7:6379") == "http://10.0.0.7:8265"
    assert built == [("10.0.0.7:6379", None)]
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6379"  # back afterwards
    from pathlib import Path

    assert "ray.dashboard" not in Path(submission.__file__).read_text()


@pytest.mark.slow  # a real Ray head with its dashboard takes ~15 s to start on 2 loaded cores
def test_a_gcs_address_of_a_real_cluster_finds_its_dashboard(monkeypatch):
    import ray

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    context = ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        gcs = context.address_info["gcs_address"]
        assert dashboard_url(gcs, {}) == f"http://{context.dashboard_url}"
    finally:
        ray.shutdown()


def test_no_address_at_all_says_where_to_get_one():
    with pytest.raises(SubmitError, match="no Ray cluster address") as error:
        dashboard_url(None, {})
    assert error.value.exit_code == 2  # a usage error: nothing was tried
    assert "RAY_API_SERVER_ADDRESS" in error.value.hint and "make cluster-up" in error.value.hint


@pytest.mark.parametrize("address", ["ray://head:10001", "auto", "head", "head:port"])
def test_addresses_of_other_kinds_are_refused(address):
    with pytest.raises(SubmitError, match="expected") as error:
        dashboard_url(address, {})
    assert error.value.exit_code == 2


def test_an_unreachable_cluster_is_one_line_and_a_hint(stack_env, capsys):
    code = main(["--address", f"127.0.0.1:{closed_port()}", "train"])
    err = capsys.readouterr().err
    assert code == 1  # a cluster that is down: a runtime failure, not a usage error
    lines = err.strip().splitlines()
    assert lines[0].startswith("flowray submit: error: cannot reach the Ray GCS at 127.0.0.1:")
    assert lines[1].startswith("hint: ") and "--address" in lines[1]
    assert "Traceback" not in err

    code = main(["--address", f"http://127.0.0.1:{closed_port()}", "train"])
    assert code == 1
    assert "cannot reach the Ray job server at http://127.0.0.1:" in capsys.readouterr().err


class FakeJobSubmissionClient:
    """Stands in for Ray's client: records the address and the environment it was built in."""

    built: list[tuple[str, str | None]] = []
    error: Exception | None = None

    def __init__(self, address: str) -> None:
        import os

        if self.error:
            raise self.error
        FakeJobSubmissionClient.built.append((address, os.environ.get("RAY_API_SERVER_ADDRESS")))


def test_connect_uses_the_chosen_url_even_when_the_environment_names_another(
    stack_env, monkeypatch, listening_port
):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobSubmissionClient)
    FakeJobSubmissionClient.built = []
    url = f"http://127.0.0.1:{listening_port}"
    submission.connect(url)
    # Ray's client would prefer RAY_API_SERVER_ADDRESS over its argument: it is hidden meanwhile,
    # and back afterwards.
    assert FakeJobSubmissionClient.built == [(url, None)]
    import os

    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8265"


def test_a_refused_token_gets_the_auth_hint(stack_env, monkeypatch, listening_port, capsys):
    import ray.job_submission
    from ray.exceptions import AuthenticationError

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobSubmissionClient)
    monkeypatch.setattr(
        FakeJobSubmissionClient,
        "error",
        AuthenticationError("Authentication required: Unauthorized: Missing authentication token"),
    )
    code = main(["--address", f"http://127.0.0.1:{listening_port}", "sample"])
    err = capsys.readouterr().err
    assert code == 1  # the cluster refuses: a runtime failure
    assert "refused the request: Authentication required" in err
    assert "hint: " in err and "RAY_AUTH_MODE=token" in err and "ray get-auth-token" in err


# -- following the job to its end ------------------------------------------------------------------
class FakeClient:
    """A job server with one job: its log chunks and its status sequence."""

    def __init__(
        self,
        chunks: list[str],
        statuses: list[str],
        message: str = "",
        tail_error: bool = False,
        driver_exit_code: int | None = None,
    ) -> None:
        self.chunks, self.statuses, self.message = chunks, list(statuses), message
        self.tail_error = tail_error
        self.driver_exit_code = driver_exit_code
        self.submitted: dict = {}
        self.stopped = False

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return kwargs["submission_id"]

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk
        if self.tail_error:
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_info(self, job_id):
        return SimpleNamespace(message=self.message, driver_exit_code=self.driver_exit_code)

    def stop_job(self, job_id):
        self.stopped = True
        self.statuses = ["STOPPED"]
        return True


def test_follow_streams_logs_with_secrets_masked_and_returns_the_final_status(capsys):
    import sys

    client = FakeClient([f"step 1 key={SECRET}\n", "done\n"], ["SUCCEEDED"])
    assert follow(client, "job-1", sys.stdout, secrets=[SECRET]) == "SUCCEEDED"
    assert capsys.readouterr().out == "step 1 key=***\ndone\n"


def test_a_broken_log_stream_falls_back_to_polling_the_status(capsys):
    import sys

    client = FakeClient(["a\n"], ["RUNNING", "RUNNING", "FAILED"], tail_error=True)
    assert follow(client, "job-1", sys.stdout, poll_s=0) == "FAILED"
    assert "log stream interrupted" in capsys.readouterr().out


def _run_with(monkeypatch, client: FakeClient, argv: list[str]) -> int:
    monkeypatch.setattr("jobs.submit.connect", lambda url: client)
    return main(argv)


@pytest.mark.parametrize(
    ("status", "driver_code", "code"),
    [
        ("SUCCEEDED", 0, 0),
        ("FAILED", 1, 1),
        ("FAILED", 3, 3),  # finished with items left out: the job's own code, not 1
        ("FAILED", 2, 2),
        ("FAILED", None, 1),  # no driver exit code in the job's details (the driver never ran)
        ("FAILED", -9, 1),  # the driver killed by a signal
        ("STOPPED", None, 1),
    ],
)
def test_exit_code_is_the_jobs_own(stack_env, monkeypatch, capsys, status, driver_code, code):
    client = FakeClient(
        ["working\n"],
        [status],
        message=f"exit code 1; {SECRET}\nmore",
        driver_exit_code=driver_code,
    )
    assert _run_with(monkeypatch, client, ["--submission-id", "j-1", "train", "--x"]) == code
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith(f"job j-1: {status} after ")
    if status != "SUCCEEDED":
        assert last.endswith(": exit code 1; ***")  # the server's reason, first line, masked
    assert SECRET not in captured.out + captured.err
    assert client.submitted["entrypoint"] == "python -m jobs.train --x"
    assert not set(client.submitted["runtime_env"]["env_vars"]) & set(STACK_ENV) - {
        "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"
    }  # fmt: skip
    assert client.submitted["metadata"] == {"flowray_command": "train"}


def test_forward_credentials_puts_them_in_the_runtime_env(stack_env, monkeypatch, capsys):
    client = FakeClient([], ["SUCCEEDED"])
    argv = ["--forward-credentials", "--submission-id", "j-4", "score"]
    assert _run_with(monkeypatch, client, argv) == 0
    assert client.submitted["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert SECRET not in "".join(capsys.readouterr())


def test_logs_lose_url_passwords_too(capsys):
    import sys

    client = FakeClient(
        ["tracking at https://bob:hunter22@mlflow.example.com/api\n"], ["SUCCEEDED"]
    )
    assert follow(client, "job-1", sys.stdout) == "SUCCEEDED"
    assert capsys.readouterr().out == "tracking at https://mlflow.example.com/api\n"


class NoAgentYet(FakeClient):
    """A fresh cluster: "No available agent" to the first `refusals` submissions."""

    def __init__(self, refusals: int) -> None:
        super().__init__([], ["SUCCEEDED"])
        self.refusals = refusals

    def submit_job(self, **kwargs):
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError(
                "Request failed with status code 503: No available agent to submit job, please "
                "try again later."
            )
        return super().submit_job(**kwargs)


def test_submit_retries_until_the_job_agent_is_up_then_gives_up_with_a_hint():
    from pipeline.submission import submit

    waits: list[float] = []
    spec = JobSpec("score", [], submission_id="j-5")
    assert submit(NoAgentYet(refusals=3), spec, sleep=waits.append) == "j-5"
    assert waits == [1.0, 2.0, 4.0]
    waits.clear()
    with pytest.raises(SubmitError, match="no job agent after 31 s") as error:
        submit(NoAgentYet(refusals=100), spec, agent_wait_s=30, sleep=waits.append)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0] and "dashboard_agent.log" in error.value.hint


def test_no_wait_prints_the_job_id_and_returns(stack_env, monkeypatch, capsys):
    client = FakeClient([], ["PENDING"])
    assert _run_with(monkeypatch, client, ["--no-wait", "--submission-id", "j-2", "score"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "j-2"
    assert "ray job logs -f --address http://127.0.0.1:8265 j-2" in captured.err


def test_ctrl_c_stops_the_job(stack_env, monkeypatch, capsys):
    client = FakeClient([], ["RUNNING"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("jobs.submit.follow", interrupted)
    assert _run_with(monkeypatch, client, ["--submission-id", "j-3", "sample"]) == 1
    captured = capsys.readouterr()
    assert client.stopped
    assert "stopping job j-3" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("job j-3: STOPPED")
