"""What the training workers tell the outside: MLflow metrics and artifacts from rank 0, one-line
progress messages to the driver, and the sample grid drawn at each evaluation.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flowmodel import Flow

__all__ = [
    "RunLogger",
    "format_eta",
    "quiet_ray_train_reports",
    "sample_grid",
    "say",
    "start_system_metrics",
    "stop_system_metrics",
]


GRID_SCALE = 3  # 28 x 28 samples are too small to see at 1:1 in MLflow's UI


MAX_BUFFERED_METRICS = 100_000  # about 20 MB; the oldest go first when MLflow stays away longer
LOG_BATCH_LIMIT = 1000  # MLflow's log_batch takes at most 1000 metrics per call


class RunLogger:
    """Rank 0's MLflow writes, batched; a no-op on other ranks and without a run.

    Best effort: training must not die because the tracking server does. Metrics that MLflow
    refuses (a connection error, a 5xx) wait in a bounded buffer and go out with the next write
    that succeeds; images are dropped instead. One line says MLflow went away, one that it is back.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        active: bool,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.client: Any = None
        self.run_id = run_id
        self.pending: deque[Any] = deque(maxlen=MAX_BUFFERED_METRICS)
        self.failing = False
        self.note = note or say
        if active and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Logs the finite values at `step`; NaN and infinities are left out, as MLflow wants."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(
            Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(float(v))
        )
        self.flush()

    def flush(self) -> None:
        """Sends the buffered metrics, oldest first, in log_batch-sized chunks."""
        while self.pending:
            chunk = [self.pending[i] for i in range(min(LOG_BATCH_LIMIT, len(self.pending)))]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as error:
                self._went_away(error)
                return
            for _ in chunk:
                self.pending.popleft()
        if self.failing:
            self.failing = False
            self.note("MLflow answers again: buffered metrics sent")

    def _went_away(self, error: Exception) -> None:
        if not self.failing:
            self.failing = True
            self.note(
                f"MLflow not answering ({type(error).__name__}: {str(error)[:200]}); training goes "
                f"on, metrics buffered (up to {MAX_BUFFERED_METRICS}) until it answers"
            )

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        """An RGB uint8 image under `key` at `step`: MLflow's UI shows the steps on a slider."""
        if self.client is None:
            return
        try:
            self.client.log_image(self.run_id, image, key=key, step=step)
        except Exception as error:  # an image is not worth a buffer: this one is lost
            self._went_away(error)


def sample_grid(flow: Flow, temperature: float, step: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] of 64 samples in an 8 x 8 grid, upscaled x3, seeded by `step` so that a
    rerun draws the same grid."""
    from pipeline.plots import image_grid

    images = flow.sample(64, temperature=temperature, generator=torch.Generator().manual_seed(step))
    grid = image_grid(images.numpy(), columns=8)  # (H, W, 3)
    return grid.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1)  # nearest-neighbour


def start_system_metrics(
    tracking_uri: str | None,
    run_id: str | None,
    sampling_interval: float = 10.0,
    note: Callable[[str], None] | None = None,
) -> Any | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU when pynvml sees one) for the run,
    sampled on this machine by MLflow's own thread until `stop_system_metrics`. Returns None,
    after one line through `note`, when MLflow has no monitor or it cannot start: training goes on
    without these metrics."""
    if not (tracking_uri and run_id):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a resumed run continues the system metrics' steps after the last one.
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=sampling_interval,
            resume_logging=True,
            tracking_uri=tracking_uri,
        )
        monitor.start()
    except Exception as error:  # ImportError, a missing psutil, an MLflow that does not answer
        (note or say)(f"MLflow system metrics off: {type(error).__name__}: {error}")
        return None
    return monitor


def stop_system_metrics(monitor: Any | None, note: Callable[[str], None] | None = None) -> None:
    """Stops the monitor's thread and flushes what it sampled; a failure is one line, not an error
    (the run's own results are already reported)."""
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as error:
        (note or say)(f"MLflow system metrics not flushed: {type(error).__name__}: {error}")


def quiet_ray_train_reports(verbose: bool) -> None:
    """In a worker: Ray Train V2 logs one INFO line per `ray.train.report` on every worker
    ("Reporting training result ... 'val_bits_per_dim': ..."), next to our own progress lines,
    and MLflow's system-metrics monitor four INFO lines about starting and stopping; unless
    `verbose`, both show warnings only. (The rest of Ray Train's INFO lines go through
    `ray.train.RunConfig(logging_config=...)`, `ray_train_log_level`.)"""
    if verbose:
        return
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its chatter stays, nothing breaks
        return
    context.logger.setLevel(logging.WARNING)


def ray_train_log_level(verbose: bool) -> str:
    """Ray Train's own console level (its public LoggingConfig): its controller's and workers'
    INFO lines (resources requested, worker group started, model moved, checkpoint created)
    only with verbose."""
    return "INFO" if verbose else "WARNING"


def say(message: str) -> None:
    """One line to the driver. Ray Train V2 turns a worker's print() into a log record and, when
    sys.stdout is wrapped (as MLflow's import does), also tees it, so each line showed twice;
    writing to the real stdout gives Ray's log forwarding exactly one copy."""
    print(message, file=sys.__stdout__, flush=True)


def format_eta(seconds: float) -> str:
    """`7m05s`; `?` when the time left is unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
