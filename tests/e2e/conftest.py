"""Fixtures for the cluster end-to-end tests: the local stack of infra/local, started by its scripts.

local_stack   function-scoped handle on one session-wide stack: moto S3, an MLflow server and a
              two-node Ray cluster (head + worker node) on loopback, in a temporary stack dir. Each
              request (re)starts whatever is not running, so a test may stop parts of it (fault
              tests, teardown checks) without breaking the tests after it. Torn down at session end.
stack         the same `LocalStack` without the (re)start: for tests that manage it themselves.

`LocalStack` gives the addresses (.s3_endpoint, .bucket, .tracking_uri, .ray_address (GCS),
.dashboard_url), .env (what the scripts export) and .environ() (os.environ plus that, for
subprocesses such as `ray job submit`), .up()/.down() per service, .stop_worker_node() /
.start_worker_node(), .restart_s3() (objects carried over), .use_cluster_settings() (node sizes of
the next cluster-up), .process_groups() and .live_processes() for checks.

Scripts run with this interpreter's bin directory first on PATH (ray, mlflow, moto_server) and pick
free ports when the defaults are taken, so a developer's own `make cluster-up` can keep running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "infra" / "local"
SERVICES = ("s3", "mlflow", "cluster")  # start order; stopped in reverse
# Process groups (pid files) per service, as the scripts name them.
GROUPS = {"s3": ("s3",), "mlflow": ("mlflow",), "cluster": ("ray-head", "ray-worker")}
SCRIPT_TIMEOUT_S = 240


def parse_exports(text: str) -> dict[str, str]:
    """`export K=V` lines (what the start scripts print) as a dict."""
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line.removeprefix("export ").partition("=")
            env[key.strip()] = value.strip()
    return env


@dataclass
class LocalStack:
    stack_dir: Path
    exports: dict[str, dict[str, str]] = field(default_factory=dict)  # per service
    # Settings for cluster-up.sh (RAY_HEAD_CPUS, ...): see use_cluster_settings.
    cluster_settings: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What the running services' start scripts exported."""
        return {k: v for service in SERVICES for k, v in self.exports.get(service, {}).items()}

    # -- running the scripts ------------------------------------------------------------------
    def script_environ(self) -> dict[str, str]:
        environ = dict(os.environ)
        environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
        environ["FLOWRAY_STACK_DIR"] = str(self.stack_dir)
        environ["FLOWRAY_PYTHON"] = sys.executable
        # The stack chooses these; values from the caller's shell must not leak in.
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
            environ.pop(name, None)
        for name in ("S3_PORT", "MLFLOW_PORT", "RAY_GCS_PORT", "RAY_DASHBOARD_PORT"):
            environ.pop(name, None)
        return environ

    def run_script(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> str:
        """Run infra/local/<name>.sh; return its stdout; fail the test with its stderr."""
        environ = self.script_environ() | (extra_env or {})
        result = subprocess.run(
            ["bash", str(SCRIPTS / f"{name}.sh"), *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
        )
        if result.returncode != 0:
            pytest.fail(f"{name}.sh {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result.stdout

    def up(self, *services: str) -> LocalStack:
        """Start the given services (default: all) unless they run; collect their env. The
        cluster counts as up once its job server takes jobs (see wait_for_job_agent)."""
        for service in services or SERVICES:
            extra = self.cluster_settings if service == "cluster" else None
            self.exports[service] = parse_exports(self.run_script(f"{service}-up", extra_env=extra))
            if service == "cluster":
                self.wait_for_job_agent()
        return self

    def wait_for_job_agent(self) -> None:
        """Wait until the head node's job agent takes a job. cluster-up.sh returns once both
        nodes are up, but the dashboard agent that runs jobs may register seconds later (more on
        a loaded machine), and the job server answers "No available agent to submit job" to any
        submission before that (after waiting only 10 s itself). So: submit a no-op job until it
        is accepted, then wait for it to end."""
        code = f"""
            import sys, time
            from ray.job_submission import JobStatus, JobSubmissionClient
            client = JobSubmissionClient({self.dashboard_url!r})
            deadline = time.monotonic() + {SCRIPT_TIMEOUT_S}
            while True:
                try:
                    job = client.submit_job(entrypoint="true")
                    break
                except RuntimeError as err:
                    if "No available agent" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            while client.get_job_status(job) not in {{JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                     JobStatus.STOPPED}}:
                assert time.monotonic() < deadline, "the no-op job did not end"
                time.sleep(0.5)
            print(client.get_job_status(job))
            """
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S + 60,
        )
        if result.returncode != 0 or "SUCCEEDED" not in result.stdout:
            pytest.fail(f"the cluster's job server takes no job:\n{result.stderr[-4000:]}")

    def use_cluster_settings(self, **settings: str) -> None:
        """cluster-up.sh settings (RAY_HEAD_CPUS="3", ...) for the cluster from now on; none means
        the scripts' defaults. A cluster running with other settings is stopped first, so the next
        up() starts one that has them (a worker node restarted later gets them too)."""
        if settings != self.cluster_settings and "cluster" in self.exports:
            self.down("cluster")
        self.cluster_settings = dict(settings)

    def restart_s3(self) -> None:
        """Stop the S3 endpoint and start it again on the same port, like an outage of a real
        endpoint. moto keeps objects in memory only, so the bucket's objects are read just before
        the stop and written back after the start (a write that lands in between is lost, as
        in-flight writes are in an outage)."""
        import boto3

        def client():
            return boto3.client(
                "s3",
                endpoint_url=self.s3_endpoint,
                region_name=self.env["AWS_DEFAULT_REGION"],
                aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            )

        s3, bucket = client(), self.bucket
        objects = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                objects[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        port = self.s3_endpoint.rsplit(":", 1)[1]
        self.down("s3")
        self.exports["s3"] = parse_exports(self.run_script("s3-up", extra_env={"S3_PORT": port}))
        s3 = client()
        for key, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)

    def down(self, *services: str) -> None:
        """Stop the given services (default: all, in reverse start order)."""
        for service in services or tuple(reversed(SERVICES)):
            self.run_script(f"{service}-down")
            self.exports.pop(service, None)

    def stop_worker_node(self, kill: bool = False) -> None:
        """Stop the Ray worker node only (SIGKILL at once with kill=True)."""
        extra = {"FLOWRAY_STACK_STOP_TIMEOUT": "0"} if kill else None
        self.run_script("cluster-down", "worker", extra_env=extra)

    def start_worker_node(self) -> None:
        """Start the worker node again (with the current cluster settings)."""
        self.up("cluster")

    # -- addresses ------------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def bucket(self) -> str:
        return self.env["FLOWRAY_BUCKET"]

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def ray_address(self) -> str:
        """The GCS address: ray.init(address=...), `ray status --address`."""
        return self.env["RAY_ADDRESS"]

    @property
    def dashboard_url(self) -> str:
        """The dashboard / job server: `ray job submit --address`, JobSubmissionClient."""
        return self.env["RAY_API_SERVER_ADDRESS"]

    def environ(self) -> dict[str, str]:
        """os.environ plus the stack's exports, for subprocesses (ray job submit, jobs); this
        interpreter's bin directory comes first on PATH, so `ray` and `mlflow` are the project's."""
        environ = dict(os.environ) | self.env
        environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
        return environ

    # -- processes ------------------------------------------------------------------------------
    def process_groups(self) -> dict[str, int]:
        """Recorded process group per pid file (only for what is recorded now)."""
        groups = {}
        for names in GROUPS.values():
            for name in names:
                pid_file = self.stack_dir / f"{name}.pid"
                if pid_file.exists():
                    groups[name] = int(pid_file.read_text().split()[0])
        return groups

    @staticmethod
    def live_processes(pgid: int) -> list[int]:
        """Live (not zombie) processes of a process group."""
        out = subprocess.run(
            ["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True, check=True
        ).stdout
        return [
            int(pid)
            for pid, group, stat in (line.split() for line in out.splitlines() if line.strip())
            if int(group) == pgid and not stat.startswith("Z")
        ]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    handle = LocalStack(stack_dir=tmp_path_factory.mktemp("stack"))
    yield handle
    handle.down()
    # A long stack dir puts Ray's temp dirs under /tmp (socket path limit), linked from stack/ray.
    ray_root = handle.stack_dir / "ray"
    if ray_root.is_symlink():
        shutil.rmtree(ray_root.resolve(), ignore_errors=True)


@pytest.fixture
def local_stack(stack: LocalStack) -> LocalStack:
    return stack.up()
