"""In-process training races: flowray's model against normflows' Glow at a matched size, each
trained with flowray's recipe (`pipeline.train`: optimizer, warmup, clipping, EMA) by the same
plain torch loop, their steps alternating so that both see the same load on a shared machine.
Used by the quality, training and ablation suites.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowmodel import Flow, dequantize
from pipeline.bench.harness import median, preset_flow
from pipeline.train.config import TrainConfig
from pipeline.train.ema import EMA
from pipeline.train.step import (
    StepMetrics,
    budget_progress,
    make_optimizer,
    set_learning_rate,
    train_step,
)

__all__ = [
    "Contender",
    "contender",
    "race",
    "global_batch",
    "make_contender",
    "normflows_bits_per_dim",
    "normflows_glow",
    "normflows_step",
    "paired_models",
    "parameter_count",
    "TimedTrainer",
    "train_interleaved",
    "TrainRun",
]

LN2 = math.log(2)


def normflows_glow(levels: int, steps: int, hidden: int, image_shape: Sequence[int]) -> nn.Module:
    """normflows' multiscale Glow, unconditional, as its Glow example builds it.

    Per level: `steps` GlowBlocks (affine coupling with a 3x3-1x1-3x3 ConvNet, LU 1x1 conv,
    ActNorm), a Squeeze, and a Merge between levels; a trainable diagonal Gaussian base per latent
    (DiagGaussian, one mean and log-scale per element, as flowray's learned priors). Level i = 0 is
    the coarsest. Inputs are dequantized images in [0, 1), no logit.
    """
    import normflows as nf

    channels, height, width = image_shape
    q0, merges, flows = [], [], []
    for i in range(levels):
        blocks = [
            nf.flows.GlowBlock(
                channels * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True
            )
            for _ in range(steps)
        ]
        flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            factor = 2 ** (levels - i)
            latent = (channels * factor, height // factor, width // factor)
        else:
            factor = 2**levels
            latent = (channels * factor * 2, height // factor, width // factor)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def paired_models(config: TrainConfig, init_batch: Tensor) -> tuple[Flow, nn.Module]:
    """flowray's preset model and normflows' Glow at the same levels, steps and width, both given
    their data-dependent initialisation on `init_batch` (uint8 images), as the Ray Train job does
    for flowray: normflows' ActNorms initialise on their first batch, so they get the same one."""
    flow = preset_flow(config.model, init_batch, config.seed)
    model = config.model
    glow = normflows_glow(
        model.levels, model.steps_per_level, model.hidden_channels, model.image_shape
    )
    with torch.no_grad():
        noise = torch.Generator().manual_seed(config.seed)
        glow.log_prob(dequantize(init_batch, model.n_bits, noise), None)
    return flow, glow


def normflows_bits_per_dim(model: nn.Module, y: Tensor, n_bits: int = 8) -> Tensor:
    """Per-image bits/dim of dequantized images y = (x + u) / 2**n_bits in [0, 1) under normflows.

    The same bound as flowray's `bits_per_dim_from_log_prob`:
        flowray:   bpd = -log p(y) / (D ln 2) + n_bits      (flowmodel.flow, log_prob in nats)
        normflows: bpd = -model.log_prob(y) / (D ln 2) + n_bits
    where the + n_bits is the dequantization constant D * n_bits * ln 2 / (D ln 2) (the density of
    y on [0, 1)^D versus the discrete x), so both count bits/dim identically.
    """
    dims = y[0].numel()
    return -model.log_prob(y, None) / (dims * LN2) + n_bits


def global_batch(config: TrainConfig) -> int:
    """The batch one optimizer step of the Ray Train job sees: `batch_size` per worker times the
    workers (DDP averages their gradients). The in-process benches train at this batch, so their
    recipe is the job's: same updates per image, same learning rate per update."""
    return config.batch_size * config.scaling.num_workers


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def normflows_step(
    model: nn.Module,
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None,
    generator: torch.Generator | None,
    n_bits: int = 8,
) -> StepMetrics:
    """`pipeline.train.step.train_step` for a normflows model: same loss, checks and clipping."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    y = dequantize(images, n_bits, generator)
    loss = normflows_bits_per_dim(model, y, n_bits).mean()
    if not torch.isfinite(loss):
        return StepMetrics(float(loss.detach()), math.nan, skipped=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepMetrics(float(loss.detach()), float(norm), skipped=True)
    optimizer.step()
    return StepMetrics(float(loss.detach()), float(norm), skipped=False)


@dataclass(frozen=True)
class TrainRun:
    """What a `TimedTrainer` did: steps, step seconds (nothing else) and per-window images/s."""

    steps: int
    seconds: float
    window_rates: tuple[float, ...]
    last_loss: float

    @property
    def images_per_second(self) -> float:
        """Median over windows, the first (warm-up) window left out when there are others."""
        rates = self.window_rates[1:] if len(self.window_rates) > 1 else self.window_rates
        return median(rates)


def batches(images: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled batches, reshuffled every epoch; the same order for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield images[order[start : start + batch_size]]


class TimedTrainer:
    """Calls `step(batch, step_index) -> loss` on shuffled batches, timing each step alone.

    Only step time counts towards the budget, and the rate of each window of `window_steps`
    steps is kept, so that startup (the first window) and one-off stalls do not move the median.
    """

    def __init__(
        self,
        step: Callable[[Tensor, int], float],
        images: Tensor,
        batch_size: int,
        *,
        seconds: float,
        max_steps: int | None = None,
        window_steps: int = 20,
        seed: int = 0,
    ) -> None:
        self.step, self.batch_size = step, batch_size
        self.seconds, self.max_steps, self.window_steps = seconds, max_steps, window_steps
        self._batches = batches(images, batch_size, seed)
        self.steps, self.elapsed, self.loss = 0, 0.0, math.nan
        self._window, self.rates = 0.0, []

    @property
    def progress(self) -> float:
        """The budget spent, in [0, 1]: step time against `seconds`, or steps against
        `max_steps` when that binds first (what the learning-rate schedule decays by)."""
        return budget_progress(self.steps, self.max_steps, self.elapsed, self.seconds / 60)

    @property
    def done(self) -> bool:
        return self.elapsed >= self.seconds or (
            self.max_steps is not None and self.steps >= self.max_steps
        )

    def advance(self) -> None:
        batch = next(self._batches)
        started = time.perf_counter()
        self.loss = self.step(batch, self.steps)
        took = time.perf_counter() - started
        self.steps += 1
        self.elapsed += took
        self._window += took
        if self.steps % self.window_steps == 0:
            self.rates.append(self.window_steps * self.batch_size / self._window)
            self._window = 0.0

    def result(self) -> TrainRun:
        rates = self.rates or [self.steps * self.batch_size / max(self.elapsed, 1e-9)]
        return TrainRun(self.steps, self.elapsed, tuple(rates), self.loss)


def train_interleaved(
    trainers: dict[str, TimedTrainer],
    progress: Callable[[str, TimedTrainer], None] | None = None,
) -> dict[str, TrainRun]:
    """Run the trainers' steps in turn (one step each, round robin) until each has used its budget.

    On a shared machine the load drifts over minutes; alternating steps gives every model the same
    conditions, where running them one after the other would not.
    """
    while not all(t.done for t in trainers.values()):
        for name, trainer in trainers.items():
            if not trainer.done:
                trainer.advance()
                if progress is not None:
                    progress(name, trainer)
    return {name: trainer.result() for name, trainer in trainers.items()}


@dataclass
class Contender:
    """One model in an in-process race: its trainer, EMA and count of skipped steps."""

    model: nn.Module
    ema: EMA[nn.Module]
    trainer: TimedTrainer
    skipped: int = 0

    def figures(self) -> dict[str, Any]:
        """Its training figures: parameters, steps, step seconds, images seen and per second."""
        result = self.trainer.result()
        return {
            "params": parameter_count(self.model),
            "steps": result.steps,
            "train_seconds": result.seconds,
            "images_seen": result.steps * self.trainer.batch_size,
            "images_per_second": result.images_per_second,
            "last_train_bits_per_dim": result.last_loss,
            "skipped_steps": self.skipped,
        }


def make_contender(
    model: nn.Module,
    step: Callable[[nn.Module, Tensor, torch.optim.Optimizer, torch.Generator], StepMetrics],
    images: Tensor,
    config: TrainConfig,
    *,
    batch_size: int,
    seconds: float,
    max_steps: int | None,
    window_steps: int = 20,
) -> Contender:
    """`model` trained by `step(model, batch, optimizer, generator)` with flowray's recipe, as the
    Ray Train loop runs it: the preset's optimizer and warmup, an EMA updated after every step
    that was not skipped, seeded dequantization noise and batch order; the learning rate decays
    by the trainer's `progress` (its step time against `seconds`), as the Ray Train loop decays
    by elapsed time against max_minutes."""
    optimizer = make_optimizer(model.parameters(), config.optim)
    generator = torch.Generator().manual_seed(config.seed)  # dequantization noise

    def one(batch: Tensor, index: int) -> float:
        set_learning_rate(optimizer, config.optim, index, trainer.progress)
        metrics = step(model, batch, optimizer, generator)
        if metrics.skipped:
            racer.skipped += 1
        else:
            racer.ema.update(model)
        return metrics.bits_per_dim

    trainer = TimedTrainer(
        one,
        images,
        batch_size,
        seconds=seconds,
        max_steps=max_steps,
        window_steps=window_steps,
        seed=config.seed,
    )
    racer = Contender(model, EMA(model, config.optim.ema_decay), trainer)
    return racer


STEPS = {"flowray": train_step, "normflows": normflows_step}


def contender(
    name: str,
    model: nn.Module,
    images: Tensor,
    config: TrainConfig,
    *,
    seconds: float,
    max_steps: int | None,
    batch_size: int | None = None,
    window_steps: int = 20,
) -> Contender:
    """`make_contender` with the step of `name` ("flowray" or "normflows"), the preset's
    clipping, and the job's global batch unless `batch_size` is given."""
    step, clip = STEPS[name], config.optim.max_grad_norm
    return make_contender(
        model,
        lambda m, b, o, g: step(m, b, o, max_grad_norm=clip, generator=g),
        images,
        config,
        batch_size=batch_size or global_batch(config),
        seconds=seconds,
        max_steps=max_steps,
        window_steps=window_steps,
    )


def race(
    config: TrainConfig, images: Tensor, *, seconds: float, max_steps: int | None, **options: Any
) -> dict[str, Contender]:
    """flowray's preset model and normflows' Glow (`paired_models`, initialised on the same
    batch) as contenders on `images`; `options` go to `contender`."""
    models = paired_models(config, images[: config.init_images])
    return {
        name: contender(
            name, model, images, config, seconds=seconds, max_steps=max_steps, **options
        )
        for name, model in zip(STEPS, models)
    }
