"""Rank 0's reporting helpers without a Ray cluster: Ray Train's per-report chatter is silenced
unless verbose, and
sample grids become MLflow images with their step."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.train.v2._internal.execution import context

from pipeline.train import reporting
from pipeline.train.config import TrainConfig
from pipeline.train.reporting import (
    HTTP_SETTINGS,
    RunLogger,
    quiet_ray_train_reports,
    start_system_metrics,
    stop_system_metrics,
)


@pytest.fixture
def ray_train_logger() -> Iterator[logging.Logger]:
    level = context.logger.level
    context.logger.setLevel(logging.NOTSET)
    yield context.logger
    context.logger.setLevel(level)


def test_ray_train_report_lines_are_hidden_unless_verbose(
    ray_train_logger: logging.Logger,
) -> None:
    quiet_ray_train_reports(verbose=True)
    assert ray_train_logger.level == logging.NOTSET
    quiet_ray_train_reports(verbose=False)
    assert ray_train_logger.level == logging.WARNING
    assert not ray_train_logger.isEnabledFor(logging.INFO)


def test_verbose_is_off_by_default_and_settable() -> None:
    assert TrainConfig().verbose is False
    assert TrainConfig.from_dict({"verbose": True}).verbose is True


def test_sample_grids_are_mlflow_images_with_their_step(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(
        client.create_experiment("grids", artifact_location=(tmp_path / "artifacts").as_uri())
    ).info.run_id
    grid = np.zeros((30, 48, 3), dtype=np.uint8)
    grid[:, :24] = 200
    logger = RunLogger(uri, run_id, active=True)
    logger.image(grid, "samples", step=7)
    RunLogger(uri, run_id, active=False).image(grid, "samples", step=8)  # other ranks: nothing
    assert logger.close() == (0, 0)
    paths = [a.path for a in client.list_artifacts(run_id, "images")]
    png = [p for p in paths if p.endswith(".png")]
    assert len(png) == 1 and png[0].startswith("images/samples+step+7+")
    logged = np.asarray(Image.open(client.download_artifacts(run_id, png[0], str(tmp_path))))
    np.testing.assert_array_equal(logged[..., :3], grid)


def test_system_metrics_are_sampled_into_the_run_until_stopped(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(
        client.create_experiment("system", artifact_location=(tmp_path / "artifacts").as_uri())
    ).info.run_id
    monitor = start_system_metrics(uri, run_id, sampling_interval=0.05)
    assert monitor is not None
    deadline = time.monotonic() + 60
    # MLflow's monitor counts the samples it has published in _logging_step.
    while monitor._logging_step < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_system_metrics(monitor)
    metrics = client.get_run(run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_without_mlflow_system_metrics_training_goes_on_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    lines: list[str] = []
    assert start_system_metrics(f"sqlite:///{tmp_path}/m.db", "run", note=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("MLflow system metrics off: ModuleNotFoundError")
    stop_system_metrics(None, note=lines.append)
    assert len(lines) == 1


class FlakyClient:
    """A real MLflow client whose writes fail while `down` is set, as a lost server's would."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.down = False

    def log_batch(self, run_id: str, metrics: list[Any]) -> None:
        if self.down:
            raise ConnectionError("Connection refused")
        self.client.log_batch(run_id, metrics=metrics)

    def log_image(self, run_id: str, image: np.ndarray, key: str, step: int) -> None:
        if self.down:
            raise ConnectionError("Connection refused")
        self.client.log_image(run_id, image, key=key, step=step)


def test_metrics_survive_an_mlflow_outage_and_are_sent_when_it_answers(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(
        client.create_experiment("outage", artifact_location=(tmp_path / "artifacts").as_uri())
    ).info.run_id
    lines: list[str] = []
    logger = RunLogger(uri, run_id, active=True, note=lines.append)
    flaky = FlakyClient(client)
    logger.sender.client = flaky
    logger.metrics({"loss": 5.0}, step=1)
    assert logger.sender.wait(30)
    flaky.down = True
    for step in range(2, 6):
        logger.metrics({"loss": 6.0 - step / 10}, step=step)
    logger.image(np.zeros((4, 4, 3), dtype=np.uint8), "samples", step=5)
    while not lines:  # the sender meets the outage on its next send (the test's timeout bounds it)
        time.sleep(0.05)
    assert not logger.sender.wait(0.1)  # still queued: MLflow refuses
    assert len(lines) == 1 and lines[0].startswith("MLflow not answering (ConnectionError")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    flaky.down = False
    logger.metrics({"loss": 5.3}, step=6)
    assert logger.sender.wait(30)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [
        (1, 5.0),
        (2, 5.8),
        (3, 5.7),
        (4, 5.6),
        (5, 5.5),
        (6, 5.3),
    ]
    assert lines[1:] == ["MLflow answers again: buffered metrics sent"]
    assert [a.path for a in client.list_artifacts(run_id, "images")][0].startswith(
        "images/samples+step+5+"
    )
    assert not (logger.sender.metrics or logger.sender.images) and logger.close() == (0, 0)


def test_what_cannot_be_sent_by_close_is_counted_and_said(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("never")).info.run_id
    lines: list[str] = []
    logger = RunLogger(uri, run_id, active=True, note=lines.append)
    flaky = FlakyClient(client)
    flaky.down = True
    logger.sender.client = flaky
    logger.metrics({"loss": 5.0, "lr": 1e-3}, step=1)
    logger.image(np.zeros((4, 4, 3), dtype=np.uint8), "samples", step=1)
    started = time.monotonic()
    assert logger.close(timeout=1.0) == (2, 1)
    assert time.monotonic() - started < 5
    assert lines[-1] == (
        "MLflow: 2 metric value(s) and 1 image(s) of this run were never logged (the tracking "
        "server did not answer in time)"
    )


class GatedClient:
    """A real MLflow client whose first `log_batch` waits until the test opens the gate."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.entered, self.gate = threading.Event(), threading.Event()

    def log_batch(self, run_id: str, metrics: list[Any]) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(60)
        self.client.log_batch(run_id, metrics=metrics)


def test_a_queue_overflowing_during_a_send_drops_only_unsent_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporting, "MAX_BUFFERED_METRICS", 4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("overflow")).info.run_id
    logger = RunLogger(uri, run_id, active=True, note=lambda line: None)
    gated = GatedClient(client)
    logger.sender.client = gated
    logger.metrics({"loss": 1.0}, step=1)
    assert gated.entered.wait(60)  # step 1 is being sent
    for step in range(2, 7):  # the queue holds 4: steps 1 (in flight) and 2 are pushed out
        logger.metrics({"loss": float(step)}, step=step)
    gated.gate.set()
    assert logger.sender.wait(60)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 3, 4, 5, 6]
    assert logger.close() == (1, 0)  # step 2, the one value never sent


def start_mlflow_server(port: int, root: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` over a SQLite store in `root`, answering /health."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]  # fmt: skip
    log = root / f"server-{time.monotonic_ns()}.log"
    with open(log, "w") as output:  # its own session: stop_server ends its workers with it
        server = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            time.sleep(0.25)


def stop_server(server: subprocess.Popen) -> None:
    """Stops the server and the workers it started (its process group, made for it)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.integration  # a real `mlflow server` and a few hundred training steps
def test_steps_keep_their_pace_while_the_tracking_server_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps that log every step (and a grid every GRID_EVERY) run as fast while the tracking
    server is down (a closed port) as while it is up (a real `mlflow server`); blocks of each
    alternate, so a machine whose load drifts slows both alike. A block lasts until the logger
    has seen the state it is about (failing while down, answering again while up), however fast
    the machine steps, so the test waits for conditions, not for times. What could not be sent
    while it was down is sent when it is back."""
    import torch

    from flowmodel import FlowConfig, build_flow
    from pipeline.train.step import train_step

    for name in HTTP_SETTINGS:  # RunLogger sets MLflow's HTTP settings: undone after the test
        monkeypatch.delenv(name, raising=False)
    port, closed = free_port(), free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, tmp_path)
    try:
        up = MlflowClient(uri)
        down = MlflowClient(f"http://127.0.0.1:{closed}")  # nobody listens: connection refused
        run_id = up.create_run(up.create_experiment("down")).info.run_id
        lines: list[str] = []
        logger = RunLogger(uri, run_id, active=True, note=lines.append)
        torch.manual_seed(0)
        flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=1, steps_per_level=2))
        images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
        flow.initialize(images)
        optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
        grid = np.zeros((96, 96, 3), dtype=np.uint8)
        slowest_call, step = 0.0, 0

        def steps(count: int) -> float:
            """Runs `count` steps that log; their seconds."""
            nonlocal slowest_call, step
            started = time.perf_counter()
            for _ in range(count):
                step += 1
                measured = train_step(flow, images[:16], optimizer)
                called = time.perf_counter()
                logger.metrics({"loss": measured.bits_per_dim, "lr": 1e-3}, step)
                if step % GRID_EVERY == 0:
                    logger.image(grid, "samples", step)
                slowest_call = max(slowest_call, time.perf_counter() - called)
            return time.perf_counter() - started

        def block(client: MlflowClient, failing: bool) -> tuple[int, float]:
            """Steps (at least 40, in tens) until the logger's `failing` is as asked."""
            logger.sender.client = client
            count, seconds = 0, 0.0
            while count < 40 or logger.sender.failing != failing:
                seconds += steps(10)
                count += 10
                assert count < 20_000, f"the logger never saw the server {('up', 'down')[failing]}"
            return count, seconds

        steps(20)  # warm-up: the first HTTP connection, torch's first passes
        done = {"up": [0, 0.0], "down": [0, 0.0]}
        for _ in range(4):
            for state, client in (("up", up), ("down", down)):
                count, seconds = block(client, failing=state == "down")
                done[state][0] += count
                done[state][1] += seconds
        block(up, failing=False)
        assert logger.close() == (0, 0)  # everything was sent in the end
        rate = {state: count / seconds for state, (count, seconds) in done.items()}
        ratio = rate["down"] / rate["up"]
        print(
            f"steps/s with the server up {rate['up']:.1f}, down {rate['down']:.1f}: ratio "
            f"{ratio:.3f}; slowest log call {slowest_call * 1000:.1f} ms"
        )
        assert ratio > 0.8
        assert slowest_call < 1.0
        history = up.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, step + 1))
        grids = [a.path for a in up.list_artifacts(run_id, "images") if a.path.endswith(".png")]
        # One grid per GRID_EVERY steps, by step. A grid may be stored twice: the stand-in "down"
        # client still reaches the artifact store (mlflow-artifacts: resolves to the server that
        # is up), so a send that failed on its metadata uploaded the file before it was retried.
        grid_steps = {int(path.split("+step+")[1].split("+")[0]) for path in grids}
        assert grid_steps == set(range(GRID_EVERY, step + 1, GRID_EVERY))
        assert lines[0].startswith("MLflow not answering")
        assert "MLflow answers again: buffered metrics sent" in lines
    finally:
        stop_server(server)


# Few enough grids that a down block never queues more than RunLogger keeps (MAX_BUFFERED_IMAGES).
GRID_EVERY = 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
