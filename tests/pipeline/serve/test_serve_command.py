"""`flowray serve` as a user runs it: a process that starts its own local Ray and Ray Serve on a
loopback port, answers a PNG, and stops cleanly on Ctrl-C; and the usage errors it refuses before
starting anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs import serve as serve_job
from tests.pipeline.flow_fixtures import TrainedModel
from tests.pipeline.serve.conftest import ScoredImages, free_port

REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 300  # a fresh local Ray, Ray Serve and the model, beside the session's Ray
STOP_TIMEOUT_S = 120


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> dict:
    """Poll until the command says it serves (its "serving ..." line: start-up is over) and
    /health answers; fail fast if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"flowray serve exited {process.returncode}:\n{log.read_text()[-4000:]}")
        if "\nserving " in "\n" + log.read_text():
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.5)  # a poll interval
    pytest.fail(f"flowray serve not serving after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def test_flowray_serve_answers_a_png_and_stops_on_ctrl_c(
    trained_model: TrainedModel, scored_images: ScoredImages, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "jobs.serve", "--model", str(trained_model.directory),
        "--port", str(port), "--tracking-uri", trained_model.tracking_uri,
        "--reload-interval-s", "0", "--cpus-per-replica", "0.5",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,  # its Ray processes go with it if the test fails
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_until_serving(url, process, log)
        assert health["model"] == "local" and len(health["version"]) == 12
        request = urllib.request.Request(
            f"{url}/score", scored_images.pngs[0], {"Content-Type": "image/png"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (prediction,) = json.loads(response.read())["predictions"]
        assert 2.0 < prediction["bits_per_dim"] < 8.0
        assert prediction["key"].startswith("sha256:")

        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()[-4000:]
        text = log.read_text()
        assert f"serving {trained_model.directory} (local v{health['version']}" in text
        assert f"curl -s -H 'Content-Type: image/png' --data-binary @image.png {url}/score" in text
        assert "stopping" in text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_detach_without_a_cluster_is_a_usage_error(
    trained_model: TrainedModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["--model", str(trained_model.directory), "--detach"]
    assert serve_job.main([*argv, "--tracking-uri", trained_model.tracking_uri]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("flowray serve: error: --detach: expected a Ray cluster")
    assert err[1].startswith("hint: drop --detach")


def test_a_port_in_use_is_a_usage_error_before_ray_starts(
    trained_model: TrainedModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--model", str(trained_model.directory), "--port", str(port)]
        assert serve_job.main([*argv, "--tracking-uri", trained_model.tracking_uri]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}: expected a free port, found it in use" in err
    assert "hint: pass another --port" in err


def test_an_unknown_alias_fails_in_seconds_listing_the_aliases(
    trained_model: TrainedModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    argv = ["--model", "models:/fmnist-test@best", "--port", str(free_port())]
    assert serve_job.main([*argv, "--tracking-uri", trained_model.tracking_uri]) == 2
    assert time.monotonic() - started < 60  # no Ray, no Serve retries of a failing replica
    err = capsys.readouterr().err
    assert "model 'models:/fmnist-test@best' not found: 'fmnist-test' has aliases" in err
    assert "hint: check the name and alias with `flowray models list`" in err
