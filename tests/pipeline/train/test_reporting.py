"""Rank 0's reporting helpers without a Ray cluster: Ray Train's per-report chatter is silenced
unless verbose, and
sample grids become MLflow images with their step."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.train.v2._internal.execution import context

from pipeline.train.config import TrainConfig
from pipeline.train.reporting import (
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
    RunLogger(uri, run_id, active=True).image(grid, "samples", step=7)
    RunLogger(uri, run_id, active=False).image(grid, "samples", step=8)  # other ranks: nothing
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
    logger.client = flaky
    logger.metrics({"loss": 5.0}, step=1)
    flaky.down = True
    for step in range(2, 6):
        logger.metrics({"loss": 6.0 - step / 10}, step=step)
    logger.image(np.zeros((4, 4, 3), dtype=np.uint8), "samples", step=5)
    assert len(lines) == 1 and lines[0].startswith("MLflow not answering (ConnectionError")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    flaky.down = False
    logger.metrics({"loss": 5.3}, step=6)
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
    assert not logger.pending
