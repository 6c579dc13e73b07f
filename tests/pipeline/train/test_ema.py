"""The EMA shared by the Ray Train loop and the benchmarks: its arithmetic, where its copy lives,
and its state round trip (weights and update count)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.train.ema import EMA, ema_decay


def scalar_model(weight: float, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """y = w * x with one weight, plus a buffer, so the arithmetic can be checked by hand."""
    model = nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.fill_(weight)
    model.register_buffer("counter", torch.tensor(0.0, dtype=dtype))
    return model


def set_weight(model: nn.Linear, weight: float) -> None:
    with torch.no_grad():
        model.weight.fill_(weight)


def test_decay_warms_up_then_stays_at_the_configured_value() -> None:
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.999, 100_000) == 0.999
    assert ema_decay(0.0, 5) == 0.0


def test_each_update_moves_the_average_by_one_minus_the_decay() -> None:
    model = scalar_model(0.0)
    ema = EMA(model, decay=0.999)
    set_weight(model, 1.0)
    ema.update(model)  # d_1 = 2/11: 0 + (9/11) * (1 - 0)
    assert ema.model.weight.item() == pytest.approx(9 / 11)
    set_weight(model, 2.0)
    ema.update(model)  # d_2 = 3/12
    assert ema.model.weight.item() == pytest.approx(9 / 11 + 0.75 * (2 - 9 / 11))
    assert ema.updates == 2


def test_buffers_are_copied_not_averaged_and_decay_zero_follows_the_model() -> None:
    model = scalar_model(0.0)
    ema = EMA(model, decay=0.0)
    set_weight(model, 3.0)
    model.counter.fill_(7.0)
    ema.update(model)
    assert ema.model.weight.item() == 3.0
    assert ema.model.counter.item() == 7.0


def test_the_average_is_a_frozen_copy_that_moves_only_on_update() -> None:
    model = scalar_model(1.0)
    ema = EMA(model, decay=0.9)
    set_weight(model, 5.0)
    assert ema.model.weight.item() == 1.0
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_the_copy_keeps_the_models_dtype_and_device() -> None:
    ema = EMA(scalar_model(0.5, torch.float64), decay=0.9)
    assert ema.model.weight.dtype == torch.float64
    assert ema.model.counter.dtype == torch.float64
    on_meta = EMA(nn.Linear(3, 2, device="meta"), decay=0.9)
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}
    if torch.cuda.is_available():
        cuda = EMA(scalar_model(0.5).cuda(), decay=0.9)
        assert cuda.model.weight.is_cuda


def test_state_round_trip_continues_the_same_warm_up() -> None:
    model = scalar_model(0.0)
    first = EMA(model, decay=0.99)
    for weight in (1.0, 2.0, 3.0):
        set_weight(model, weight)
        first.update(model)
    average = 0.0
    for t, weight in enumerate((1.0, 2.0, 3.0), start=1):
        average += (1 - (1 + t) / (10 + t)) * (weight - average)
    assert first.model.weight.item() == pytest.approx(average)

    # A resumed run makes its EMA from a model in another state, then loads the saved one.
    second = EMA(scalar_model(-4.0, torch.float64), decay=0.99)
    second.load_state_dict(first.state_dict())
    assert second.updates == 3
    assert second.model.weight.dtype == torch.float64  # loaded onto the copy's own dtype
    assert second.model.weight.item() == pytest.approx(average)
    # Update 4 uses d_4 = 5/14; a count restarted at 0 would use d_1 = 2/11.
    second.update(scalar_model(10.0, torch.float64))
    assert second.model.weight.item() == pytest.approx(average + (9 / 14) * (10.0 - average))


def test_the_device_count_gives_the_host_counts_arithmetic_to_the_last_bit() -> None:
    """On a device the count and the weight are tensors (no host read); they must give the
    numbers of the host's Python arithmetic, and a False verdict must change nothing."""
    from tests.pipeline.device_audit import AUDIT_DEVICE, AuditDevice, cpu_values

    torch.manual_seed(0)
    host_model = nn.Linear(4, 3)
    host = EMA(host_model, decay=0.99)
    with AuditDevice() as audit:
        device_model = copy_of(host_model).to(AUDIT_DEVICE)
        device = EMA(device_model, decay=0.99)
        for update in range(14):
            with torch.no_grad():
                for model in (host_model, device_model):
                    for param in model.parameters():
                        step = torch.full(param.shape, float(update), device=param.device)
                        param.copy_(step.sin() + param)
            applied = update % 5 != 3  # every fifth step skipped
            if applied:
                host.update(host_model)
            device.update(device_model, torch.tensor(applied, device=AUDIT_DEVICE))
        assert audit.host_reads == []
    assert device.updates == host.updates == 11
    for average, expected in zip(device.model.parameters(), host.model.parameters(), strict=True):
        assert torch.equal(cpu_values(average), expected)


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
