"""The learning-rate schedule: warm-up times a decay over the budget spent, by steps or by elapsed
training time, the same after a resume; and the elapsed time a checkpoint carries."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowmodel import FlowConfig, build_flow
from pipeline.train.checkpoint import (
    TrainState,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.train.config import OptimSettings, TrainConfig
from pipeline.train.step import budget_progress, learning_rate, set_learning_rate
from pipeline.train.worker import train_loop_per_worker
from tests.pipeline.train.fake_ray_train import FakeRayTrain
from tests.pipeline.train.tiny_run import make_split, split_images, tiny_config


def test_constant_schedule_is_the_old_warmup_whatever_the_progress() -> None:
    optim = OptimSettings(lr=2e-3, warmup_steps=4)
    for progress in (0.0, 0.5, 1.0):
        rates = [learning_rate(optim, step, progress) for step in range(6)]
        assert rates == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])


def test_cosine_and_linear_decay_to_min_lr_ratio_at_the_end_of_the_budget() -> None:
    cosine = OptimSettings(lr=1e-3, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    linear = OptimSettings(lr=1e-3, warmup_steps=0, schedule="linear", min_lr_ratio=0.1)
    # decay(p) = r + (1 - r)(1 + cos(pi p))/2 and r + (1 - r)(1 - p), r = 0.1
    assert learning_rate(cosine, 100, 0.0) == pytest.approx(1e-3)
    assert learning_rate(cosine, 100, 0.5) == pytest.approx(0.55e-3)
    assert learning_rate(cosine, 100, 0.25) == pytest.approx(
        1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    )
    assert learning_rate(cosine, 100, 1.0) == pytest.approx(1e-4)
    assert learning_rate(linear, 100, 0.25) == pytest.approx(0.775e-3)
    assert learning_rate(linear, 100, 1.0) == pytest.approx(1e-4)
    # Past the budget (the last step's clock overshoots) it stays at the floor.
    assert learning_rate(linear, 100, 1.7) == pytest.approx(1e-4)


def test_warm_up_multiplies_the_decay() -> None:
    optim = OptimSettings(lr=1e-3, warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert learning_rate(optim, 4, 0.5) == pytest.approx(1e-3 * 0.5 * 0.5)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert set_learning_rate(optimizer, optim, 9, 0.2) == pytest.approx(0.8e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.8e-3)


def test_progress_follows_whichever_budget_binds_first() -> None:
    assert budget_progress(100, 1000, elapsed_seconds=30.0, max_minutes=1.0) == 0.5
    assert budget_progress(900, 1000, elapsed_seconds=30.0, max_minutes=1.0) == 0.9
    assert budget_progress(100, 1000, elapsed_seconds=600.0, max_minutes=None) == 0.1
    assert budget_progress(100, None, elapsed_seconds=90.0, max_minutes=1.0) == 1.0
    assert budget_progress(100, None, elapsed_seconds=90.0, max_minutes=None) == 0.0


def test_min_lr_ratio_is_checked() -> None:
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimSettings(min_lr_ratio=1.5)


def test_old_checkpoints_without_the_schedule_keys_resume_under_the_default() -> None:
    current = TrainConfig().to_dict()
    saved = TrainConfig().to_dict()
    del saved["optim"]["schedule"], saved["optim"]["min_lr_ratio"]
    assert config_differences(saved, current) == []
    cosine = TrainConfig.from_dict({"optim": {"schedule": "cosine"}}).to_dict()
    assert config_differences(saved, cosine) == ["optim.schedule"]


def test_checkpoint_carries_elapsed_seconds_and_old_ones_read_zero(tmp_path: Path) -> None:
    flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    state = TrainState(5, 40, 0, {}, torch.get_rng_state(), {"train": [], "validation": []}, 5)
    state.elapsed_seconds = 123.5
    save_checkpoint(tmp_path, flow, flow, state, {})
    assert load_checkpoint(tmp_path)[2].elapsed_seconds == 123.5
    raw = torch.load(tmp_path / "state.pt", weights_only=True)
    del raw["elapsed_seconds"]
    torch.save(raw, tmp_path / "state.pt")
    assert load_checkpoint(tmp_path)[2].elapsed_seconds == 0.0


def test_a_resumed_run_continues_its_time_budget_and_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = make_split(tmp_path / "data")
    optim = {"warmup_steps": 0, "schedule": "linear", "lr": 1e-3}
    first = tiny_config(split, max_steps=2, max_minutes=5, optim=optim)
    ray_train = FakeRayTrain(torch.device("cpu"), split_images(split), tmp_path / "a")
    with monkeypatch.context() as patch:
        ray_train.install(patch)
        train_loop_per_worker({"train": first.to_dict()})
    checkpoint = ray_train.reports[-1]["checkpoint"]
    assert 0 < load_checkpoint(checkpoint)[2].elapsed_seconds < 300
    # As if the first attempt had used the whole 5-minute budget before its checkpoint.
    raw = torch.load(checkpoint / "state.pt", weights_only=True)
    raw["elapsed_seconds"] = 300.0
    torch.save(raw, checkpoint / "state.pt")

    resumed = FakeRayTrain(torch.device("cpu"), split_images(split), tmp_path / "b", checkpoint)
    with monkeypatch.context() as patch:
        resumed.install(patch)
        train_loop_per_worker(
            {"train": tiny_config(split, max_steps=50, max_minutes=5, optim=optim).to_dict()}
        )
    # One step (the budget is spent after it), not 48 more; it ran at the schedule's floor.
    assert [int(r["step"]) for r in resumed.reports] == [3]
    _, _, state = load_checkpoint(resumed.reports[-1]["checkpoint"])
    assert state.elapsed_seconds > 300
    assert state.optimizer["param_groups"][0]["lr"] == 0.0
