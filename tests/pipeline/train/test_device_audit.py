"""Device discipline, checked on the CPU: the training core, the collectives, evaluation,
scoring and sampling run with the model on a stand-in accelerator (tests/pipeline/device_audit.py)
that fails, as CUDA would, on any CPU tensor meeting a device tensor, and collectives that refuse
tensors off the worker's device, as NCCL does. The audited device computes on the CPU underneath,
so its results must equal the CPU path's exactly. The worker loop itself: test_worker_device.py.

CPU tests cannot prove that CUDA works (pipeline.bench.gpu runs on a GPU for that); they catch a
tensor made in the wrong place, which is what broke the GPU path before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from flowmodel import FlowConfig, build_flow
from pipeline.model.likelihood import keyed_bits_per_dim, keyed_noise, predict_frame
from pipeline.train.core import run_step, start_training
from pipeline.train.distributed import all_agree_on_device, check_identical_start, slowest
from pipeline.train.ema import EMA
from pipeline.train.reporting import sample_grid
from tests.pipeline.device_audit import (
    AUDIT_DEVICE,
    AuditDevice,
    AuditTensor,
    DeviceMismatch,
    audit_collectives,
)
from tests.pipeline.train.tiny_run import MODEL, smooth_images, tiny_config

CPU = torch.device("cpu")


def test_training_core_puts_model_average_and_optimizer_state_on_the_device() -> None:
    config = tiny_config("unread")
    images = torch.from_numpy(smooth_images(8)[:, None])
    flow = build_flow(config.model)
    flow.initialize(images)
    with AuditDevice():
        training = start_training(flow, config, AUDIT_DEVICE)
        for step in range(2):
            metrics = run_step(training, config, images, step)  # CPU images: moved by the step
            assert not metrics.skipped and np.isfinite(metrics.bits_per_dim)
    assert {p.device for p in training.model.parameters()} == {AUDIT_DEVICE}
    assert {p.device for p in training.ema.model.parameters()} == {AUDIT_DEVICE}
    moments = [
        value
        for state in training.optimizer.state.values()
        for name, value in state.items()
        if name != "step"  # Adam keeps its step count on the CPU by design
    ]
    assert moments and {m.device for m in moments} == {AUDIT_DEVICE}
    assert training.ema.updates == 2
    assert training.ema.model.precision == "fp32"


def test_collectives_reduce_tensors_on_the_device_they_are_given() -> None:
    flow = build_flow(FlowConfig(**{**MODEL, "image_shape": (1, 8, 8)}))
    with audit_collectives(AUDIT_DEVICE) as audit, AuditDevice():
        flow.to(AUDIT_DEVICE)
        assert slowest(2.5, AUDIT_DEVICE) == 2.5
        assert (
            all_agree_on_device(torch.tensor(False, device=AUDIT_DEVICE), dist.ReduceOp.MAX).item()
            is False
        )
        (checksum,) = check_identical_start(flow, AUDIT_DEVICE)
    assert [name for name, _ in audit.calls] == ["all_reduce", "all_reduce", "all_gather"]
    assert checksum == check_identical_start(flow.to("cpu"), CPU)[0]


def test_evaluation_scoring_and_sampling_on_the_device_give_the_cpu_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipeline.model.likelihood as likelihood

    torch.manual_seed(0)
    cpu_flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    images = torch.from_numpy(smooth_images(10)[:, None])
    cpu_flow.initialize(images)
    keys = [f"k{i}" for i in range(10)]
    expected = (
        keyed_bits_per_dim(cpu_flow, keys, images, seed=3),
        predict_frame(cpu_flow, images.numpy(), keys, seed=3, draws=2),
        sample_grid(cpu_flow, 0.7, step=5),
    )
    # Chunks of 3 images on the device, so that the chunked path is checked too.
    monkeypatch.setattr(likelihood, "CHUNK_DIMS", 3 * 64)
    with AuditDevice():
        flow = EMA(cpu_flow, 0.5).model.to(AUDIT_DEVICE)
        bits = keyed_bits_per_dim(flow, keys, images, seed=3)
        assert isinstance(bits, AuditTensor)
        frame = predict_frame(flow, images.numpy(), keys, seed=3, draws=2)
        grid = sample_grid(flow, 0.7, step=5)
    torch.testing.assert_close(bits.cpu(), expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(frame["bits_per_dim"], expected[1]["bits_per_dim"], atol=1e-5)
    np.testing.assert_array_equal(grid, expected[2])


def test_the_audit_refuses_what_cuda_refuses() -> None:
    """The audit is only useful if it fails: an EMA copied before the model moved, a CPU tensor
    handed to a collective, and numpy() of a device tensor all raise."""
    flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    with AuditDevice():
        stale = EMA(flow, 0.9)  # made on the CPU
        flow.to(AUDIT_DEVICE)
        with pytest.raises(DeviceMismatch, match="lerp_.*expected every tensor on meta, found cpu"):
            stale.update(flow)
        with pytest.raises((RuntimeError, TypeError)):
            flow.top_prior.mu.detach().numpy()
    with audit_collectives(AUDIT_DEVICE), pytest.raises(DeviceMismatch, match="found cpu"):
        slowest(1.0, CPU)


def test_keyed_noise_is_drawn_on_the_cpu_with_the_numbers_it_always_had() -> None:
    # Values from commit 3bd0f9c: the same per-key noise on any device, before and after.
    noise = keyed_noise(["a"], (4,), seed=0, scheme="mt19937-v1")  # old models' noise
    assert noise.device == CPU and noise.dtype == torch.float64
    assert noise[0].tolist() == [
        0.28682486815015484,
        0.14101932057890965,
        0.47781912141659855,
        0.8969959321684695,
    ]
