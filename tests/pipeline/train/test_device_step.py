"""The training step decided on the device: applied steps are the host-decided step's to the last
bit, a skipped step leaves weights, optimizer state and EMA as if it had not run, and the worker's
way of running steps (`run_step`, `record_outcome`, `settle` every N) reads the device at most
once every N steps, where the host-decided step read it four times a step.

`host_decided_step` is the step as it was before it moved to the device, kept here as the
reference: the same loss, clipping and optimizer, with the decisions made by reading the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flowmodel import build_flow
from pipeline.train.core import Training, run_step, start_training
from pipeline.train.ema import EMA
from pipeline.train.loop_state import LoopState, record_outcome, settle
from pipeline.train.step import (
    StepMetrics,
    batch_bits_per_dim,
    flow_bits_per_dim,
    make_optimizer,
    train_step,
)
from tests.pipeline.device_audit import AUDIT_DEVICE, AuditDevice, cpu_values
from tests.pipeline.train.tiny_run import smooth_images, tiny_config

CPU = torch.device("cpu")
CONFIG = tiny_config("unread")


def host_decided_step(
    model: nn.Module, images: Tensor, optimizer: torch.optim.Optimizer, max_grad_norm: float
) -> StepMetrics:
    """The step with its decisions on the host (four reads of the device per step)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    mean = batch_bits_per_dim(model, images).mean()
    if not bool(torch.isfinite(mean)):
        return StepMetrics(bits_per_dim=float(mean.detach()), grad_norm=math.nan, skipped=True)
    mean.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepMetrics(bits_per_dim=float(mean.detach()), grad_norm=float(norm), skipped=True)
    optimizer.step()
    return StepMetrics(bits_per_dim=float(mean.detach()), grad_norm=float(norm), skipped=False)


def batch(step: int) -> Tensor:
    return torch.from_numpy(smooth_images(8, seed=step)[:, None])


def fresh_training(device: torch.device) -> Training:
    torch.manual_seed(0)
    flow = build_flow(CONFIG.model)
    flow.initialize(batch(0), generator=torch.Generator().manual_seed(0))
    return start_training(flow, CONFIG, device)


def snapshot(training: Training) -> dict[str, Tensor]:
    """Everything a step may change, as CPU tensors: weights, optimizer state, EMA and count."""
    values = {f"flow.{k}": v for k, v in training.flow.state_dict().items()}
    values |= {f"ema.{k}": v for k, v in training.ema.model.state_dict().items()}
    values["ema.count"] = training.ema.count
    for index, state in training.optimizer.state_dict()["state"].items():
        values |= {f"optimizer.{index}.{k}": v for k, v in state.items()}
    return {k: cpu_values(v).detach().clone() for k, v in values.items()}


def assert_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    assert not different, f"expected identical values, found differences in {different}"


def nan_loss(model: nn.Module, y: Tensor) -> Tensor:
    return flow_bits_per_dim(model, y) * math.nan


def nan_gradient(model: nn.Module, y: Tensor) -> Tensor:
    """A finite loss whose gradient is NaN: d/dp sqrt(0 * p) = 0 * inf."""
    first = next(model.parameters())
    return flow_bits_per_dim(model, y) + (first.sum() * 0).sqrt()


@pytest.mark.parametrize("device", [CPU, AUDIT_DEVICE], ids=["cpu", "device"])
def test_applied_steps_are_bit_identical_to_the_host_decided_step(device: torch.device) -> None:
    """On the CPU the host reads the verdict; on the device the update is kept by torch.where
    (with Adam's step count on the CPU, as the host-decided step had it, so that the arithmetic
    is the same)."""
    with AuditDevice():
        device_decided, host_decided = fresh_training(device), fresh_training(CPU)
        device_decided.optimizer = make_optimizer(device_decided.model.parameters(), CONFIG.optim)
        for step in range(6):
            torch.manual_seed(step)  # the dequantization noise of both steps
            outcome = train_step(
                device_decided.model, batch(step), device_decided.optimizer, max_grad_norm=50.0
            )
            torch.manual_seed(step)
            reference = host_decided_step(
                host_decided.model, batch(step), host_decided.optimizer, max_grad_norm=50.0
            )
            assert outcome.read() == reference
            assert not reference.skipped
    assert_identical(snapshot(device_decided), snapshot(host_decided))


def run_steps(device: torch.device, losses: list[Callable[[nn.Module, Tensor], Tensor] | None]):
    """Steps of `run_step` with these loss functions (None: the real one); each step's noise seed
    and learning rate follow its position among the real steps, so that a run with bad steps
    inserted gives its real steps the same noise and rate as the run without them."""
    training = fresh_training(device)
    real = 0
    outcomes = []
    for loss in losses:
        training.generator.manual_seed(100 + real)
        training.loss.eager = loss or flow_bits_per_dim
        outcomes.append(run_step(training, CONFIG, batch(real), real).read())
        real += loss is None
    return training, outcomes


@pytest.mark.parametrize("device", [CPU, AUDIT_DEVICE], ids=["cpu", "device"])
def test_a_skipped_step_leaves_weights_optimizer_state_and_ema_as_if_it_had_not_run(
    device: torch.device,
) -> None:
    with AuditDevice():
        clean, _ = run_steps(device, [None, None, None])
        # Skipped at the very first step (Adam's state does not exist yet), then with a NaN loss
        # and with a finite loss whose gradient is NaN.
        bumpy, outcomes = run_steps(device, [nan_loss, None, nan_loss, None, nan_gradient, None])
    assert [o.skipped for o in outcomes] == [True, False, True, False, True, False]
    assert math.isnan(outcomes[2].bits_per_dim) and math.isfinite(outcomes[4].bits_per_dim)
    assert bumpy.ema.updates == clean.ema.updates == 3
    assert_identical(snapshot(bumpy), snapshot(clean))
    steps = [cpu_values(s["step"]) for s in bumpy.optimizer.state.values()]
    assert {float(s) for s in steps} == {3.0}
    if device == AUDIT_DEVICE:  # capturable: the step count beside its parameter
        assert {
            s.device for s in bumpy.optimizer.state[next(bumpy.flow.parameters())].values()
        } == {AUDIT_DEVICE}


@pytest.mark.parametrize("sync_every", [1, 4, 5])
def test_the_worker_reads_the_device_at_most_once_every_n_steps(sync_every: int) -> None:
    steps = 12
    state = LoopState()
    with AuditDevice() as audit:
        training = fresh_training(AUDIT_DEVICE)
        audit.host_reads.clear()
        for step in range(steps):
            record_outcome(state, run_step(training, CONFIG, batch(step), step))
            if state.step % sync_every == 0 or state.step == steps:
                settle(state, global_batch=8, max_skipped=3)
        reads = list(audit.host_reads)
    assert len(reads) == math.ceil(steps / sync_every), reads
    assert (state.step, state.skipped_steps, state.images_seen) == (12, 0, 96)
    assert [int(s) for s, _ in state.history["train"]] == list(range(1, 13))


def test_the_host_decided_step_read_the_device_four_times_a_step() -> None:
    """What the count above would have found before: 4 reads a step (is the loss finite, is the
    norm finite, and the two figures), plus one for the all-reduced verdict with workers."""
    with AuditDevice() as audit:
        training = fresh_training(AUDIT_DEVICE)
        optimizer = torch.optim.Adam(training.model.parameters(), lr=1e-3)
        audit.host_reads.clear()
        for step in range(3):
            host_decided_step(training.model, batch(step), optimizer, max_grad_norm=50.0)
        reads = list(audit.host_reads)
    assert len(reads) == 3 * 4, reads


def test_settle_stops_at_the_step_that_reached_the_non_finite_limit() -> None:
    from pipeline.train.loop_state import NonFiniteLoss
    from pipeline.train.step import StepOutcome

    def outcome(applied: bool) -> StepOutcome:
        bits = torch.tensor(4.0 if applied else math.inf)
        return StepOutcome(bits, torch.tensor(1.0), torch.tensor(applied))

    state = LoopState()
    for applied in (True, False, False, False, True):
        record_outcome(state, outcome(applied))
    with pytest.raises(NonFiniteLoss, match="3 consecutive .*last at step 4") as stop:
        settle(state, global_batch=8, max_skipped=3)
    assert stop.value.step == 4 and state.skipped_steps == 3 and state.images_seen == 8


def test_an_ema_update_of_a_skipped_step_changes_nothing() -> None:
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, torch.tensor(False))
    assert ema.updates == 0
    assert all(torch.equal(v, before[k]) for k, v in ema.model.state_dict().items())
    ema.update(model, torch.tensor(True))
    assert ema.updates == 1
    assert torch.equal(ema.model.weight, before["weight"].lerp(model.weight, 1 - 2 / 11))
