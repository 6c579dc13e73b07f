"""The Ray Train worker loop on a device that is not the CPU, checked on the CPU.

The real `train_loop_per_worker` runs as the only worker with Ray Train's per-worker API standing
in for Ray (fake_ray_train.py), its model on a stand-in accelerator that fails like CUDA on any
CPU tensor meeting a device tensor, and collectives that refuse tensors off the worker's device,
as NCCL does (tests/pipeline/device_audit.py). The audited device computes on the CPU underneath,
so figures computed there must equal the CPU path's to the last bit.

These tests use only what the worker loop had before its device fixes (train_loop_per_worker,
TrainConfig, checkpoints), so they ran against the old loop too, and failed there. The loop reads
the device (a host sync on a GPU) only at its reads, every `sync_every` steps and at its duties.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowmodel import FlowConfig, build_flow
from pipeline.data.reader import iter_input
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.ema import EMA
from pipeline.train.step import evaluate_bits_per_dim, train_step
from pipeline.train.worker import train_loop_per_worker
from tests.pipeline.device_audit import AUDIT_DEVICE, AuditDevice, audit_collectives
from tests.pipeline.train.fake_ray_train import FakeRayTrain
from tests.pipeline.train.tiny_run import make_split, smooth_images, split_images, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_split(tmp_path_factory.mktemp("device-data"))


def run_worker(
    config: TrainConfig,
    device: torch.device,
    saved_to: Path,
    monkeypatch: pytest.MonkeyPatch,
    resume_from: Path | None = None,
) -> tuple[FakeRayTrain, list[tuple[str, list[torch.device]]]]:
    """The real worker loop as the only worker, on `device`, checked by the audit."""
    ray_train = FakeRayTrain(device, split_images(config.data.train), saved_to, resume_from)
    with monkeypatch.context() as patch:
        ray_train.install(patch)
        with audit_collectives(device) as collectives, AuditDevice():
            train_loop_per_worker({"train": config.to_dict()})
    return ray_train, collectives.calls


def validation_bits(flow, config: TrainConfig) -> float:
    shape = tuple(config.model.image_shape)
    rows = list(iter_input(config.data.validation, shape=shape))[: config.data.validation_limit]
    keys = [row["key"] for row in rows]
    images = torch.from_numpy(np.stack([row["image"] for row in rows]))
    return evaluate_bits_per_dim(flow, [(keys, images)], seed=config.eval_seed)[0]


def test_worker_loop_keeps_model_collectives_and_checkpoints_on_the_worker_device(
    split: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(split)
    ray_train, collectives = run_worker(config, AUDIT_DEVICE, tmp_path, monkeypatch)

    # One worker: the model still reached its device (prepare_model moved it or found it there).
    assert ray_train.prepared == [{AUDIT_DEVICE}]
    # The start-checksum all_gather, then per step "all finite?" and, at the read of step 2
    # (a log and checkpoint step before the last), "out of time?": every tensor on the worker's
    # device.
    names = [name for name, _ in collectives]
    assert names == ["all_gather"] + ["all_reduce"] * (4 + 1)
    assert all(devices == [AUDIT_DEVICE] * len(devices) for _, devices in collectives)
    assert [int(r["step"]) for r in ray_train.reports] == [2, 4]
    # Written from the device, read on the CPU: the EMA gives the validation figure the loop
    # reported, to the last bit (the audited device computes on the CPU underneath).
    flow, ema, state = load_checkpoint(ray_train.reports[-1]["checkpoint"])
    assert state.step == 4 and state.ema_updates == 4
    assert all(p.device == CPU for p in [*flow.parameters(), *ema.parameters()])
    reported = ray_train.reports[-1]["val_bits_per_dim"]
    assert np.isfinite(reported) and validation_bits(ema, config) == reported


def test_a_device_checkpoint_resumes_on_the_cpu_and_a_cpu_one_on_the_device(
    split: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_device, _ = run_worker(tiny_config(split), AUDIT_DEVICE, tmp_path / "a", monkeypatch)
    step_2 = on_device.reports[0]["checkpoint"]
    resumed_cpu, _ = run_worker(tiny_config(split), CPU, tmp_path / "b", monkeypatch, step_2)
    resumed_device, _ = run_worker(
        tiny_config(split), AUDIT_DEVICE, tmp_path / "c", monkeypatch, step_2
    )
    # Both resumes continue from step 2, and train the same numbers on either device, up to
    # the rounding of Adam's bias corrections: float32 on the device (a capturable optimizer,
    # its step count beside the parameters), float64 on the host for the CPU.
    for resumed in (resumed_cpu, resumed_device):
        assert [int(r["step"]) for r in resumed.reports] == [4]
    bits = [r.reports[0]["val_bits_per_dim"] for r in (resumed_cpu, resumed_device)]
    assert np.isfinite(bits[0]) and bits[0] == pytest.approx(bits[1], rel=1e-6, abs=0)
    from_cpu = run_worker(
        tiny_config(split, max_steps=6),
        AUDIT_DEVICE,
        tmp_path / "d",
        monkeypatch,
        resumed_cpu.reports[0]["checkpoint"],
    )[0]
    assert [int(r["step"]) for r in from_cpu.reports] == [6]


def test_optimizer_state_on_the_device_is_saved_from_the_cpu(tmp_path: Path) -> None:
    images = torch.from_numpy(smooth_images(8)[:, None])
    flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    flow.initialize(images)
    with AuditDevice():
        flow.to(AUDIT_DEVICE)
        ema = EMA(flow, 0.9)
        optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
        train_step(flow, images.to(AUDIT_DEVICE), optimizer)
        state = TrainState(1, 8, 0, optimizer.state_dict(), torch.get_rng_state(), {}, 1)
        save_checkpoint(tmp_path, flow, ema.model, state, {})
    raw = torch.load(tmp_path / "state.pt", weights_only=True)  # loads with no map_location
    moments = [v for s in raw["optimizer"]["state"].values() for v in s.values()]
    assert moments and all(type(m) is torch.Tensor and m.device == CPU for m in moments)
    assert load_checkpoint(tmp_path)[2].step == 1
