"""What the training workers tell the outside: MLflow metrics and artifacts from rank 0, one-line
progress messages to the driver, and the sample grid drawn at each evaluation.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowmodel import Flow

__all__ = ["RunLogger", "format_eta", "quiet_ray_train_reports", "sample_grid", "say"]


class RunLogger:
    """Rank 0's MLflow writes, batched; a no-op on other ranks and without a run."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, active: bool) -> None:
        self.client = None
        self.run_id = run_id
        if active and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Logs the finite values at `step`; NaN and infinities are left out, as MLflow wants."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact_bytes(self, data: bytes, path: str) -> None:
        """`data` as the run's artifact at `path` ("samples/step-0000100.png")."""
        if self.client is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            local.write_bytes(data)
            self.client.log_artifact(self.run_id, str(local), str(Path(path).parent))


def sample_grid(flow: Flow, temperature: float, step: int) -> bytes:
    """PNG of 64 samples in an 8 x 8 grid, seeded by `step` so that a rerun draws the same grid."""
    from pipeline.plots import image_grid, png_bytes

    images = flow.sample(64, temperature=temperature, generator=torch.Generator().manual_seed(step))
    return png_bytes(image_grid(images.numpy(), columns=8), scale=3)


def quiet_ray_train_reports(verbose: bool) -> None:
    """Ray Train V2 logs one INFO line per `ray.train.report` on every worker ("Reporting training
    result ... 'val_bits_per_dim': ..."), next to our own progress lines; unless `verbose`, its
    context logger (named after its file, so found through the module) shows warnings only."""
    if verbose:
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its chatter stays, nothing breaks
        return
    context.logger.setLevel(logging.WARNING)


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
