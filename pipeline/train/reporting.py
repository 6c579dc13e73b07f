"""What the training workers tell the outside: MLflow metrics and artifacts from rank 0, one-line
progress messages to the driver, and the sample grid drawn at each evaluation.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flowmodel import Flow

GRID_SCALE = 3  # 28 x 28 samples are too small to see at 1:1 in MLflow's UI
MAX_BUFFERED_METRICS = 100_000  # about 20 MB; past it the oldest go first
MAX_BUFFERED_IMAGES = 4  # sample grids waiting to be sent; past it the oldest go first
LOG_BATCH_LIMIT = 1000  # MLflow's log_batch takes at most 1000 metrics per call
# MLflow's HTTP retries and timeout (read at each request; a value the user set wins): its
# defaults make one call to a server that is down take minutes, and the sender retries anyway.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)  # the sender's waits between tries while MLflow fails
SEND_INTERVAL_SECONDS = 1.0  # gathering after a send: about one call a second, not one a step
CLOSE_SECONDS = 30.0  # how long `close` waits for what is queued to go out


class RunLogger:
    """Rank 0's MLflow writes, off the training path; a no-op on other ranks and without a run.

    `metrics` and `image` only queue, so a step never waits for MLflow; a background thread
    sends the queue, oldest first, in log_batch-sized chunks. While MLflow does not answer, the
    thread retries and the queue keeps what fits in its bounds; one line says MLflow went away,
    one that it is back. `close` says how many values were never logged. A logger dropped without
    `close` closes itself (its thread holds no reference to it). `sender` (None when inactive)
    is the thread's end, where tests wait for the queue and put a client that fails on demand.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        active: bool,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.sender: _Sender | None = None
        if active and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            if tracking_uri.startswith(("http://", "https://")):
                for name, value in HTTP_SETTINGS.items():
                    os.environ.setdefault(name, value)
            self.sender = _Sender(MlflowClient(tracking_uri), run_id, note or say)
            self._closer = weakref.finalize(self, self.sender.close)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Queues the finite values at `step` (MLflow takes no NaN or infinity)."""
        if self.sender is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [
            Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(float(v))
        ]
        self.sender.put(finite)

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        """Queues an RGB uint8 image under `key` at `step`."""
        if self.sender is not None:
            self.sender.put([(image, key, step)], images=True)

    def close(self, timeout: float = CLOSE_SECONDS) -> tuple[int, int]:
        """Sends what is queued (waiting up to `timeout`) and stops the thread; returns the
        (metrics, images) never logged."""
        if self.sender is None:
            return 0, 0
        self._closer.detach()
        return self.sender.close(timeout)


class _Sender:
    """The background thread of a RunLogger and its bounded queues."""

    def __init__(self, client: Any, run_id: str, note: Callable[[str], None]) -> None:
        self.client, self.run_id, self.note = client, run_id, note
        # Bounded: past the bound, the oldest go first.
        self.metrics: deque[Any] = deque(maxlen=MAX_BUFFERED_METRICS)
        self.images: deque[tuple[np.ndarray, str, int]] = deque(maxlen=MAX_BUFFERED_IMAGES)
        self.dropped_metrics = self.dropped_images = 0
        self.failing = False
        self.closing = False
        self.deadline = math.inf  # when closing: give up after this (time.monotonic())
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="flowray-mlflow", daemon=True)

    def put(self, items: list[Any], images: bool = False) -> None:
        """Queues metrics (or images), dropping the oldest past the queue's bound."""
        queue = self.images if images else self.metrics
        with self.condition:
            if self.closing:
                dropped = len(items)
            else:
                before = len(queue)
                queue.extend(items)
                dropped = before + len(items) - len(queue)
                if self.thread.ident is None:  # started at the first put
                    self.thread.start()
                self.condition.notify_all()
            if images:
                self.dropped_images += dropped
            else:
                self.dropped_metrics += dropped

    def wait(self, timeout: float) -> bool:
        """Waits until the queue is sent or `timeout` passes; True when sent (what is being sent
        leaves the queue once MLflow has taken it)."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while self.metrics or self.images:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.condition.wait(left)
            return True

    def close(self, timeout: float = CLOSE_SECONDS) -> tuple[int, int]:
        with self.condition:
            if not self.closing:
                self.closing = True
                self.deadline = time.monotonic() + timeout
            self.condition.notify_all()
        if self.thread.ident is not None:  # no put starts it once closing
            self.thread.join(max(self.deadline - time.monotonic(), 0) + 1.0)
        with self.condition:
            lost = (
                len(self.metrics) + self.dropped_metrics,
                len(self.images) + self.dropped_images,
            )
            self.metrics.clear()
            self.images.clear()
            self.dropped_metrics = self.dropped_images = 0
        if any(lost):
            self.note(
                f"MLflow: {lost[0]} metric value(s) and {lost[1]} image(s) of this run were never "
                "logged (the tracking server did not answer in time)"
            )
        return lost

    def _run(self) -> None:
        tries = 0
        image_next = False  # whose turn it is when both metrics and images wait
        while True:
            with self.condition:
                while not (self.metrics or self.images or self.closing):
                    self.condition.wait()
                if not (self.metrics or self.images):
                    return  # closing, nothing left
                if self.closing and time.monotonic() > self.deadline:
                    return  # what is left is counted by close()
                # Turns: a run that logs every step keeps metrics queued, and images sent only
                # once it is empty would wait until dropped.
                image_turn = bool(self.images) and (image_next or not self.metrics)
                chunk = [] if image_turn else list(itertools.islice(self.metrics, LOG_BATCH_LIMIT))
                image = self.images[0] if image_turn else None
            try:
                if chunk:
                    self.client.log_batch(self.run_id, metrics=chunk)
                else:
                    pixels, key, step = image
                    self.client.log_image(self.run_id, pixels, key=key, step=step)
            except Exception as error:
                with self.condition:
                    if not self.failing:
                        self.failing = True
                        self.note(
                            f"MLflow not answering ({type(error).__name__}: {str(error)[:200]}); "
                            f"training goes on, metrics buffered (up to {MAX_BUFFERED_METRICS}) "
                            "until it answers"
                        )
                    self.condition.notify_all()
                    pause = RETRY_SECONDS[min(tries, len(RETRY_SECONDS) - 1)]
                    tries += 1
                    if self.closing:
                        pause = min(pause, max(self.deadline - time.monotonic(), 0))
                    self.condition.wait(pause)  # close() wakes it
                continue
            tries = 0
            image_next = not image_turn
            with self.condition:
                # What was sent leaves the head of its queue. A put that overflowed the queue
                # meanwhile pushed the oldest of it out and counted them as dropped: they were
                # sent, so they are not (popping them by count would drop unsent ones instead).
                queue = self.metrics if chunk else self.images
                for item in chunk or [image]:
                    if queue and queue[0] is item:
                        queue.popleft()
                    elif chunk:
                        self.dropped_metrics -= 1
                    else:
                        self.dropped_images -= 1
                if self.failing and not (self.metrics or self.images):
                    self.failing = False
                    self.note("MLflow answers again: buffered metrics sent")
                self.condition.notify_all()
                if not (self.metrics or self.images):
                    self.condition.wait_for(
                        lambda: self.closing or len(self.metrics) >= LOG_BATCH_LIMIT,
                        SEND_INTERVAL_SECONDS,
                    )


def sample_grid(flow: Flow, temperature: float, step: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] of 64 samples in an 8 x 8 grid, upscaled, seeded by `step` so that a
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
    """MLflow's system metrics (CPU, memory, disk, network; GPU when pynvml sees one), sampled on
    this machine by MLflow's own thread until `stop_system_metrics`. None, after one line through
    `note`, when the monitor cannot start: training goes on without them."""
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
    """Stops the monitor and flushes what it sampled; a failure is one line, not an error."""
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as error:
        (note or say)(f"MLflow system metrics not flushed: {type(error).__name__}: {error}")


def quiet_ray_train_reports(verbose: bool) -> None:
    """In a worker, unless `verbose`: warnings only from Ray Train V2's worker context (an INFO
    line per `ray.train.report` on every worker) and from MLflow's system-metrics monitor."""
    if verbose:
        return
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its chatter stays, nothing breaks
        return
    context.logger.setLevel(logging.WARNING)


def say(message: str) -> None:
    """One line to the driver, on the real stdout: when sys.stdout is wrapped (MLflow's import
    does it), Ray Train V2 would forward a worker's print() twice."""
    print(message, file=sys.__stdout__, flush=True)


def format_eta(seconds: float) -> str:
    """`7m05s`; `?` when the time left is unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
