"""The worker loop's counting, without Ray: steps, images, skipped steps, the stop after too many
non-finite steps, what each report carries, the checkpoint round trip and the time left."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.loop_state import LoopState, NonFiniteLoss, eta_seconds, record_outcome, settle
from pipeline.train.reporting import format_eta
from pipeline.train.step import StepOutcome


def good(bits: float) -> StepOutcome:
    return StepOutcome(torch.tensor(bits), torch.tensor(1.0), torch.tensor(True))


def bad() -> StepOutcome:
    return StepOutcome(torch.tensor(math.inf), torch.tensor(math.nan), torch.tensor(False))


def record_step(
    state: LoopState, outcome: StepOutcome, global_batch: int, max_skipped: int
) -> None:
    """One step counted and read at once, as the worker does at sync_every = 1."""
    record_outcome(state, outcome)
    settle(state, global_batch=global_batch, max_skipped=max_skipped)


def test_steps_count_images_only_when_not_skipped() -> None:
    state = LoopState()
    for metrics in (good(5.0), bad(), good(4.5)):
        record_step(state, metrics, global_batch=64, max_skipped=3)
    assert (state.step, state.images_seen, state.skipped_steps) == (3, 128, 1)
    assert state.consecutive_skipped == 0
    assert state.history["train"] == [[1, 5.0], [2, math.inf], [3, 4.5]]


def test_too_many_consecutive_skipped_steps_stop_naming_the_last_checkpoint() -> None:
    state = LoopState(step=40, last_checkpoint_step=40)
    record_step(state, good(4.0), global_batch=8, max_skipped=3)
    record_step(state, bad(), global_batch=8, max_skipped=3)
    record_step(state, bad(), global_batch=8, max_skipped=3)
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive .* step 44\).* \(step 40\)"):
        record_step(state, bad(), global_batch=8, max_skipped=3)
    assert state.skipped_steps == 3


def test_report_carries_validation_only_when_evaluated_at_this_step() -> None:
    state = LoopState(step=20, skipped_steps=2, val_bits_per_dim=3.9, last_eval_step=20)
    assert state.report_metrics() == {"step": 20, "val_bits_per_dim": 3.9, "skipped_steps": 2}
    state.step = 30
    # No evaluation at step 30: the key is absent, not NaN (Ray Train would print the NaN).
    assert state.report_metrics() == {"step": 30, "skipped_steps": 2}


def test_checkpoint_state_round_trip() -> None:
    state = LoopState()
    for metrics in (good(6.0), bad(), good(5.5)):
        record_step(state, metrics, global_batch=32, max_skipped=5)
    state.history["validation"].append([3, 5.8])
    state.epoch = 4
    rng = torch.get_rng_state()
    saved = state.saved({"state": {}, "param_groups": []}, rng, ema_updates=2)
    assert (saved.step, saved.images_seen, saved.skipped_steps, saved.ema_updates) == (3, 64, 1, 2)
    assert torch.equal(saved.rng, rng)
    resumed = LoopState.resumed(saved)
    assert (resumed.step, resumed.images_seen, resumed.skipped_steps) == (3, 64, 1)
    assert resumed.history == {
        "train": [[1, 6.0], [2, math.inf], [3, 5.5]],
        "validation": [[3, 5.8]],
    }
    assert resumed.last_checkpoint_step == 3 and resumed.epoch == 4
    assert resumed.evaluated_at_step()
    assert resumed.last_eval_step == -1 and resumed.consecutive_skipped == 0


def test_eta_is_the_steps_left_at_this_pace_capped_by_the_time_budget() -> None:
    assert eta_seconds(100, 0.5, elapsed=10.0, max_minutes=None) == 50.0
    assert eta_seconds(100, 0.5, elapsed=40.0, max_minutes=1.0) == 20.0
    assert eta_seconds(100, 0.5, elapsed=90.0, max_minutes=1.0) == 0
    assert format_eta(425.7) == "7m05s"
    assert format_eta(math.nan) == "?"
