"""The training loop's counting, Ray-free: steps, images, skipped steps, the history of bits/dim,
the last checkpoint and evaluation, and the time left.

Steps are counted as they run (`record_outcome`), but their figures stay on the device until
`settle` reads all of them at once and counts them step by step, as if each had been read when it
ran. The non-finite guard therefore stops a run at the first settle after its limit is reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pipeline.train.checkpoint import TrainState
from pipeline.train.step import StepMetrics, StepOutcome, read_outcomes

NONFINITE_STOP = "nonfinite_stop"  # the run's file that carries a non-finite stop to the driver
# What LoopState and a checkpoint's TrainState share: every TrainState field but these three.
COUNTERS = [f.name for f in fields(TrainState) if f.name not in ("optimizer", "rng", "ema_updates")]


class NonFiniteLoss(FloatingPointError):
    """Too many consecutive non-finite steps: final, never retried from the last checkpoint
    (the same weights and data would diverge the same way)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class LoopState:
    """The step loop's counters and history: what a checkpoint restores besides the weights, and
    what this worker remembers between steps."""

    step: int = 0
    images_seen: int = 0
    skipped_steps: int = 0
    history: dict[str, list[list[float]]] = field(
        default_factory=lambda: {"train": [], "validation": []}
    )
    consecutive_skipped: int = 0
    last_checkpoint_step: int = 0
    epoch: int = 0  # passes over the training split finished
    last_eval_step: int = -1
    val_bits_per_dim: float = math.nan  # of the last evaluation (rank 0 only)
    elapsed_seconds: float = 0.0  # the step loop's wall time over all resumes (all workers agree)
    epoch_step: int = 0  # batches of the current epoch consumed (a resume skips as many)
    unread: list[StepOutcome] = field(default_factory=list)  # counted steps, figures on device

    @classmethod
    def resumed(cls, saved: TrainState) -> LoopState:
        counters = {name: getattr(saved, name) for name in COUNTERS}
        return cls(**counters, last_checkpoint_step=saved.step)

    def saved(self, optimizer: dict[str, Any], rng: torch.Tensor, ema_updates: int) -> TrainState:
        counters = {name: getattr(self, name) for name in COUNTERS}
        return TrainState(**counters, optimizer=optimizer, rng=rng, ema_updates=ema_updates)

    def evaluated_at_step(self) -> bool:
        return any(int(step) == self.step for step, _ in self.history["validation"])

    def report_metrics(self) -> dict[str, float]:
        """What `ray.train.report` carries: validation bits/dim only when evaluated at this step."""
        metrics: dict[str, float] = {"step": self.step, "skipped_steps": self.skipped_steps}
        if self.last_eval_step == self.step:
            metrics["val_bits_per_dim"] = self.val_bits_per_dim
        return metrics


def record_outcome(state: LoopState, outcome: StepOutcome) -> None:
    state.step += 1
    state.unread.append(outcome)


def settle(state: LoopState, *, global_batch: int, max_skipped: int) -> StepMetrics | None:
    """Read the figures of the steps counted since the last settle (one host read) and count
    them in order; returns the last step's figures (None when there were none). NonFiniteLoss
    at the step that makes `max_skipped` consecutive skipped steps."""
    metrics, state.unread = read_outcomes(state.unread), []
    for step, figures in enumerate(metrics, start=state.step - len(metrics) + 1):
        if figures.skipped:
            state.skipped_steps += 1
            state.consecutive_skipped += 1
            if state.consecutive_skipped >= max_skipped:
                raise NonFiniteLoss(
                    f"{state.consecutive_skipped} consecutive non-finite training steps (last at "
                    f"step {step}); stopping. The last good checkpoint (step "
                    f"{state.last_checkpoint_step}) is intact: lower optim.lr or "
                    "optim.max_grad_norm and rerun to resume from it.",
                    step=step,
                )
        else:
            state.consecutive_skipped = 0
            state.images_seen += global_batch
        state.history["train"].append([step, figures.bits_per_dim])
    return metrics[-1] if metrics else None


def eta_seconds(
    steps_left: int, seconds_per_step: float, elapsed: float, max_minutes: float | None
) -> float:
    """Time to the end of the run: the steps left at the current pace, capped by the time budget."""
    eta = steps_left * seconds_per_step
    if max_minutes is not None:
        eta = min(eta, 60 * max_minutes - elapsed)
    return max(eta, 0)
