"""Model quality at a fixed budget of step time: flowray's preset model against normflows' Glow.

Both models train in this process by the same plain torch loop (`race.make_contender`): the same
threads, batch, data order, recipe (the preset's optimizer, warmup, schedule, clipping and EMA from
`pipeline.train`) and ActNorm initialisation batch; only the model differs:

- flowray: `build_flow(config.model)` trained with `pipeline.train.step.train_step`, the step the
  Ray Train job runs.
- normflows: `MultiscaleFlow` of GlowBlock / Squeeze / Merge with DiagGaussian bases at the same
  levels, steps and width (`race.normflows_glow`, parameter counts within 1%), inputs in [0, 1).

Each trains for `minutes` of its own step time, their steps alternating so that both see the same
load. The EMA weights are then evaluated on the test split with keyed dequantization noise: the
same y = (x + u) / 256 for an image in both models, bits/dim by the same formula.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowmodel import dequantize
from pipeline.bench.harness import Result, Run, Table, fashion_mnist, timed, torch_threads
from pipeline.bench.race import (
    Contender,
    TimedTrainer,
    global_batch,
    normflows_bits_per_dim,
    parameter_count,
    race,
    train_interleaved,
)
from pipeline.config import load_config
from pipeline.model.likelihood import keyed_noise
from pipeline.train.config import TrainConfig
from pipeline.train.step import evaluate_bits_per_dim

__all__ = ["SMOKE", "TARGET_BITS_PER_DIM", "Settings", "measure", "normflows_test_bits_per_dim"]

TARGET_BITS_PER_DIM = 3.70  # flowray's test bits/dim at 10 minutes


@dataclass(frozen=True)
class Settings:
    """Attributes:
    preset: the training preset (model, batch, optimizer recipe, seeds).
    minutes: step time per model (the wall time is twice that, plus evaluation).
    train_images: the first N training images (None: all).
    test_images: the first N test images (None: all).
    max_steps: also stop after this many steps.
    threads: torch threads for both (None: one per core).
    """

    preset: str = "fashion-mnist"
    minutes: float = 10.0
    train_images: int | None = None
    test_images: int | None = None
    max_steps: int | None = None
    threads: int | None = None


SMOKE = {"minutes": 0.05, "train_images": 1024, "test_images": 256, "max_steps": 3}


@torch.no_grad()
def normflows_test_bits_per_dim(
    model: nn.Module, keys: list[str], images: Tensor, seed: int, batch_size: int = 500
) -> float:
    """Mean per-image bits/dim with the keyed noise `evaluate_bits_per_dim` uses for flowray."""
    model.eval()
    total = 0.0
    for start in range(0, len(keys), batch_size):
        chunk = images[start : start + batch_size]
        noise = keyed_noise(keys[start : start + batch_size], tuple(chunk.shape[1:]), seed)
        total += float(normflows_bits_per_dim(model, dequantize(chunk, 8, noise=noise)).sum())
    return total / len(keys)


def measure(settings: Settings, run: Run) -> Result:
    """Train both models for `minutes` of step time each, alternating steps, then evaluate them."""
    config = load_config(TrainConfig, settings.preset)
    if config.model.n_bits != 8:
        raise ValueError(f"the comparison assumes 8-bit images, found n_bits={config.model.n_bits}")
    _, train = fashion_mnist("train", settings.train_images)
    keys, test = fashion_mnist("test", settings.test_images)
    with torch_threads(settings.threads) as threads:
        contenders = race(
            config, train, seconds=60 * settings.minutes, max_steps=settings.max_steps
        )
        load = [round(os.getloadavg()[0], 2)]
        _race(contenders, settings.minutes, run)
        load.append(round(os.getloadavg()[0], 2))
        models = _test_figures(contenders, config, keys, test)
    for name, figures in models.items():
        run.log(f"{name}: test {figures['test_bits_per_dim']:.4f} bits/dim")
    ours, theirs = models["flowray"], models["normflows"]
    optim = config.optim
    figures: dict[str, Any] = {
        "settings": {
            "minutes": settings.minutes,
            "batch_size": global_batch(config),
            "threads": threads,
            "optimizer": optim.optimizer,
            "lr": optim.lr,
            "warmup_steps": optim.warmup_steps,
            "schedule": optim.schedule,
            "min_lr_ratio": optim.min_lr_ratio,
            "max_grad_norm": optim.max_grad_norm,
            "ema_decay": optim.ema_decay,
            "train_images": len(train),
            "test_images": len(test),
            "eval_seed": config.eval_seed,
            "load_average_during": load,
        },
        "models": models,
        "ratios": {
            "bits_per_dim_gain": theirs["test_bits_per_dim"] - ours["test_bits_per_dim"],
            "images_per_second": ours["images_per_second"] / theirs["images_per_second"],
            "params": ours["params"] / theirs["params"],
        },
        "targets": {
            "flowray_bits_per_dim_at_most": TARGET_BITS_PER_DIM,
            "met": bool(ours["test_bits_per_dim"] <= TARGET_BITS_PER_DIM),
        },
    }
    return Result(figures, [_table(figures)])


def _race(contenders: dict[str, Contender], minutes: float, run: Run) -> None:
    for name, contender in contenders.items():
        run.log(f"{name}: {parameter_count(contender.model):,} parameters")
    run.log(f"training both for {minutes:g} min of step time each, alternating steps")

    def progress(name: str, trainer: TimedTrainer) -> None:
        if trainer.steps % 500 == 0:
            run.log(
                f"  {name}: step {trainer.steps}, {trainer.elapsed:.0f} s, "
                f"train {trainer.loss:.3f} bits/dim"
            )

    train_interleaved({name: c.trainer for name, c in contenders.items()}, progress)


def _test_figures(
    contenders: dict[str, Contender], config: TrainConfig, keys: list[str], test: Tensor
) -> dict[str, Any]:
    """Each model's training figures and the test bits/dim of its EMA weights (keyed noise)."""
    model = config.model
    preprocess = model.preprocess
    if preprocess == "logit":
        preprocess = f"logit (alpha {model.logit_alpha:g})"
    size = config.eval_batch_size
    chunks = [(keys[i : i + size], test[i : i + size]) for i in range(0, len(test), size)]
    flowray_seconds, (bits, count) = timed(
        lambda: evaluate_bits_per_dim(contenders["flowray"].ema.model, chunks, config.eval_seed)
    )
    normflows_seconds, theirs = timed(
        lambda: normflows_test_bits_per_dim(
            contenders["normflows"].ema.model, keys, test, config.eval_seed
        )
    )
    architecture = f"{model.levels} levels x {model.steps_per_level}"
    return {
        "flowray": {
            "architecture": f"{architecture} steps, {model.hidden_channels} hidden, "
            f"{model.coupling} {model.mask} coupling, {preprocess} preprocessing",
            **contenders["flowray"].figures(),
            "test_bits_per_dim": bits,
            "test_images": count,
            "eval_seconds": flowray_seconds,
        },
        "normflows": {
            "architecture": f"{architecture} GlowBlocks, {model.hidden_channels} hidden, affine "
            "channel coupling (sigmoid scale), DiagGaussian bases, no logit",
            **contenders["normflows"].figures(),
            "test_bits_per_dim": theirs,
            "test_images": len(test),
            "eval_seconds": normflows_seconds,
        },
    }


def _table(figures: dict[str, Any]) -> Table:
    settings, models, ratios = figures["settings"], figures["models"], figures["ratios"]
    keys = ("params", "steps", "images_seen", "images_per_second", "test_bits_per_dim")
    bits = models["flowray"]["test_bits_per_dim"]
    load = settings["load_average_during"]
    return Table(
        ["model", "params", "steps", "images seen", "train images/s", "test bits/dim"],
        [[name, *(model[key] for key in keys)] for name, model in models.items()],
        [
            f"{settings['minutes']:g} min of step time each, steps alternating between the models "
            f"(load average {load[0]} before, {load[1]} after), batch {settings['batch_size']}, "
            f"{settings['threads']} torch threads, {settings['optimizer']} lr {settings['lr']:g} "
            f"(warmup {settings['warmup_steps']}, {settings['schedule']} schedule, clip "
            f"{settings['max_grad_norm']:g}, EMA {settings['ema_decay']:g} evaluated); test "
            f"bits/dim on {settings['test_images']:,} test images (keyed dequantization noise, "
            f"seed {settings['eval_seed']}), {settings['train_images']:,} training images.",
            f"flowray vs normflows: {ratios['bits_per_dim_gain']:+.3f} bits/dim better, "
            f"{ratios['images_per_second']:.2f}x the training images/s, "
            f"{ratios['params']:.3f}x the parameters.",
            f"Target flowray <= {TARGET_BITS_PER_DIM:.2f} bits/dim: "
            f"{'met' if figures['targets']['met'] else 'missed'} ({bits:.3f}, "
            f"{bits - TARGET_BITS_PER_DIM:+.3f}).",
        ],
    )
