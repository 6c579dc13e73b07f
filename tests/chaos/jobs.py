"""Running real `flowray` job processes for the chaos tests: start one against the test session's
Ray cluster, wait for a condition (never for a fixed time), SIGKILL its driver, read its log.

The jobs join the session's local Ray (`--address <its GCS address>`), as a job joins a cluster:
starting a Ray instance per process would cost ~15 s each on 2 cores. Killing the driver then is
what a lost driver is on a cluster: Ray ends the job's actors and tasks, nothing of it survives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.02
# A bound, not a wait: every wait below ends on its condition; this only stops a hung test.
DEADLINE_S = 300.0


def cluster_address() -> str:
    """The GCS address of the Ray instance this test process runs (fixture `ray_local`)."""
    import ray

    return ray.get_runtime_context().gcs_address


@dataclass
class Job:
    """A running `python -m jobs.<name>` process and its log file."""

    process: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Return once `condition()` holds; fail if the job ends first (with its log)."""
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the job ended (exit {self.process.returncode}) before {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {DEADLINE_S:.0f} s:\n{self.tail()}")
            time.sleep(POLL_S)

    def kill_driver(self) -> None:
        """SIGKILL the driver process itself, then reap anything left in its session."""
        assert self.process.poll() is None, f"the job had ended already:\n{self.tail()}"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def finish(self, timeout: float = DEADLINE_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_driver()
            raise AssertionError(
                f"the job did not end in {timeout:.0f} s:\n{self.tail()}"
            ) from None


def start_job(name: str, args: Sequence[str], log: Path) -> Job:
    """`python -m jobs.<name> <args> --address <this session's Ray>`, its output in `log`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    command = [sys.executable, "-m", f"jobs.{name}", *args, "--address", cluster_address()]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Job(process, log)


def run_job(name: str, args: Sequence[str], log: Path) -> tuple[int, str]:
    """Run a job to its end: (exit code, its log)."""
    job = start_job(name, args, log)
    code = job.finish()
    return code, job.tail(20_000)
