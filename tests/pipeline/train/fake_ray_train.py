"""Ray Train's per-worker API for one worker in this process, so that a test can run the real
worker loop (`pipeline.train.worker.train_loop_per_worker`) on a chosen device.

It stands in for Ray, not for flowray: `get_context`, `get_checkpoint`, `get_dataset_shard`,
`report`, `torch.get_device` and `torch.prepare_model` behave as Ray Train's do for a world of one
worker (prepare_model moves the model to the worker's device and does not wrap it; a dataset
shard's `iter_torch_batches` puts batches on the device asked for, "auto" being the worker's).
Reported checkpoints are copied out before `report` returns, as Ray persists them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch


@dataclass
class _Context:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


@dataclass
class _Shard:
    images: torch.Tensor  # uint8 [N, C, H, W], in manifest order
    device: torch.device

    def iter_torch_batches(
        self,
        *,
        batch_size: int,
        drop_last: bool = False,
        device: Any = "auto",
        **_: Any,
    ):
        target = self.device if device == "auto" else torch.device(device)
        end = len(self.images) - (len(self.images) % batch_size if drop_last else 0)
        for start in range(0, end, batch_size):
            yield {"image": self.images[start : start + batch_size].to(target)}


@dataclass
class FakeRayTrain:
    """Install with `install(monkeypatch)`; then call the worker loop in this process."""

    device: torch.device
    images: torch.Tensor
    saved_to: Path  # reported checkpoints go to <saved_to>/step-<n>
    resume_from: Path | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    prepared: list[set[torch.device]] = field(default_factory=list)  # devices of each model

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ray.train
        import ray.train.torch

        monkeypatch.setattr(ray.train, "get_context", lambda: _Context())
        monkeypatch.setattr(ray.train, "get_checkpoint", self._checkpoint)
        monkeypatch.setattr(
            ray.train, "get_dataset_shard", lambda name: _Shard(self.images, self.device)
        )
        monkeypatch.setattr(ray.train, "report", self._report)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: self.device)
        monkeypatch.setattr(ray.train.torch, "prepare_model", self._prepare_model)

    def _checkpoint(self) -> Any:
        import ray.train

        if self.resume_from is None:
            return None
        return ray.train.Checkpoint.from_directory(str(self.resume_from))

    def _prepare_model(self, model: torch.nn.Module, move_to_device: Any = True, **_: Any) -> Any:
        if move_to_device is not False:
            model = model.to(self.device)
        self.prepared.append({p.device for p in model.parameters()})
        return model  # one worker: Ray does not wrap in DDP

    def _report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        entry = dict(metrics)
        if checkpoint is not None:
            target = self.saved_to / f"step-{int(metrics['step'])}"
            shutil.copytree(checkpoint.path, target)
            entry["checkpoint"] = target
        self.reports.append(entry)
