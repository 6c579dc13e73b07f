"""Training checkpoints: a directory Ray Train persists to `storage_path` (local or s3://).

model.safetensors / flow_config.json   the flow being trained (pipeline.model.artifact layout)
ema/model.safetensors, ema/...         the Polyak average (the model that is evaluated and shipped)
state.pt                               optimizer state, step, counters (the EMA's update count,
                                       the epoch, the batches of it consumed and the elapsed
                                       training time among them), RNG state: tensors and plain Python only,
                                       loaded with weights_only=True
train_config.json                      the resolved TrainConfig

Every tensor is written from the CPU and read onto the CPU, so a checkpoint written on a GPU
resumes on a CPU-only machine and the reverse; `pipeline.train.core.start_training` moves what it
loads onto the worker's device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowmodel import Flow
from pipeline.model.artifact import load_flow, save_flow
from pipeline.storage import redact_url

__all__ = ["TrainState", "load_checkpoint", "save_checkpoint"]


def _on_cpu(value: Any) -> Any:
    """Every tensor in a nested state (an optimizer's state_dict) copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


@dataclass
class TrainState:
    """What a checkpoint holds besides the two models' weights."""

    step: int
    images_seen: int
    skipped_steps: int
    optimizer: dict[str, Any]
    rng: torch.Tensor
    history: dict[str, list[list[float]]]  # "train"/"validation" -> [[step, bits/dim], ...]
    ema_updates: int  # `EMA.updates`: steps that updated the average (skipped steps do not)
    epoch: int = 0  # passes over the training split finished; the shard order is seed + epoch
    # The step loop's wall time so far, over all resumes: max_minutes and the learning-rate
    # schedule count it, so a resumed run continues its budget instead of starting a new one.
    elapsed_seconds: float = 0.0
    # Batches of the current epoch this worker had consumed (trained or skipped as non-finite):
    # a resume skips that many of the epoch's stream (pipeline.train.data_order).
    epoch_step: int = 0


def save_checkpoint(
    directory: Path, flow: Flow, ema: Flow, state: TrainState, config: dict
) -> Path:
    save_flow(flow, directory)
    save_flow(ema, directory / "ema")
    torch.save(
        {
            "step": state.step,
            "images_seen": state.images_seen,
            "skipped_steps": state.skipped_steps,
            # An optimizer on a GPU holds its moments there: saved as is, they would only load
            # where that GPU exists.
            "optimizer": _on_cpu(state.optimizer),
            "rng": state.rng.cpu(),
            "history": state.history,
            "ema_updates": state.ema_updates,
            "epoch": state.epoch,
            "elapsed_seconds": state.elapsed_seconds,
            "epoch_step": state.epoch_step,
        },
        directory / "state.pt",
    )
    # No `user:password@` of a tracking URL in a checkpoint (it is stored next to the data).
    (directory / "train_config.json").write_text(redact_url(json.dumps(config, indent=2)))
    return directory


def load_checkpoint(directory: Path) -> tuple[Flow, Flow, TrainState]:
    """(flow, ema, state) from a checkpoint directory, on the CPU; nothing is unpickled."""
    flow, ema = load_flow(directory), load_flow(directory / "ema")
    # map_location: checkpoints written before optimizer states were saved from the CPU may hold
    # CUDA tensors.
    raw = torch.load(directory / "state.pt", weights_only=True, map_location="cpu")
    state = TrainState(
        step=int(raw["step"]),
        images_seen=int(raw["images_seen"]),
        skipped_steps=int(raw["skipped_steps"]),
        optimizer=raw["optimizer"],
        rng=raw["rng"],
        history=raw["history"],
        # Checkpoints written before the count was stored: their runs restarted the average's
        # warm-up at the step number.
        ema_updates=int(raw.get("ema_updates", raw["step"])),
        epoch=int(raw.get("epoch", 0)),  # checkpoints from before it was stored: epoch 0
        elapsed_seconds=float(raw.get("elapsed_seconds", 0.0)),  # likewise: from 0
        epoch_step=int(raw.get("epoch_step", 0)),  # likewise: the epoch from its start
    )
    return flow, ema, state
