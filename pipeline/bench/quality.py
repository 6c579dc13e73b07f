"""Model quality at a fixed wall-clock budget: flowray's preset model versus normflows' Glow.

    report = run(config, minutes=10)      # config: the `fashion-mnist` TrainConfig preset
    print(report["markdown"])

Both models are trained in this process by the same plain torch loop
(`pipeline.bench.race.make_contender` on a `TimedTrainer`): the same cores and threads, the same
batch size and data order (one seeded permutation of the training split per epoch), the same recipe
(the preset's optimizer, learning-rate warmup and schedule, gradient clipping and EMA, from
`pipeline.train` as the Ray Train loop uses them), the same data-dependent ActNorm initialisation
batch. Only the model differs:

- flowray: `build_flow(config.model)` trained with `pipeline.train.step.train_step`, the step
  the Ray Train job runs.
- normflows 1.7.3: `MultiscaleFlow` of GlowBlock / Squeeze / Merge with DiagGaussian bases at the
  same levels, steps and hidden width, so the parameter counts match to within 1%
  (`pipeline.bench.common.normflows_glow`); unconditional, uniform dequantization, inputs in
  [0, 1).

Each trains for `minutes` of its own step time (evaluation excluded); the two alternate steps, so
that both see the same load on this shared machine. Then the EMA weights are evaluated on
the whole test split with keyed dequantization noise: the same u for an image in both models, so
both see identical y = (x + u) / 256 and report bits/dim by the same formula
(`pipeline.bench.common.normflows_bits_per_dim`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from flowmodel import dequantize
from pipeline.bench.common import fashion_mnist, machine, markdown_table
from pipeline.bench.race import (
    Contender,
    TimedTrainer,
    global_batch,
    make_contender,
    normflows_bits_per_dim,
    normflows_step,
    paired_models,
    parameter_count,
    train_interleaved,
)
from pipeline.model.likelihood import keyed_noise
from pipeline.train.config import TrainConfig
from pipeline.train.step import evaluate_bits_per_dim, train_step

__all__ = [
    "REFERENCE_NORMFLOWS",
    "TARGET_BITS_PER_DIM",
    "markdown",
    "normflows_test_bits_per_dim",
    "run",
]

TARGET_BITS_PER_DIM = 3.70  # issue 7: flowray at 10 minutes
# Issue 7's reference: normflows (2 levels, 8 steps, 64 hidden, Adamax 1e-3, batch 64) after 10
# minutes on this machine.
REFERENCE_NORMFLOWS = {"bits_per_dim": 3.95, "images_per_second": 400.0}


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
        y = dequantize(chunk, 8, noise=noise)
        total += float(normflows_bits_per_dim(model, y).double().sum())
    return total / len(keys)


def _figures(contender: Contender, batch_size: int) -> dict[str, Any]:
    result = contender.trainer.result()
    return {
        "params": parameter_count(contender.model),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "images_seen": result.steps * batch_size,
        "images_per_second": result.images_per_second,
        "last_train_bits_per_dim": result.last_loss,
        "skipped_steps": contender.skipped,
    }


def run(
    config: TrainConfig,
    minutes: float = 10.0,
    *,
    train_images: int | None = None,
    test_images: int | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train both models for `minutes` of step time each, alternating steps, then evaluate them.

    Args:
        config: flowray's preset (model, batch size, optimizer recipe, seeds).
        minutes: training budget per model (its own step time only; the wall time is twice that).
        train_images, test_images: use the first N images of each split (None: all; smoke runs).
        max_steps: also stop after this many steps (smoke runs).
        threads: torch threads for both (None: one per core).

    Returns:
        {"machine", "settings", "models": {"flowray": {...}, "normflows": {...}}, "ratios",
         "targets", "markdown"}; each model has params, steps, images_per_second and
        test_bits_per_dim.
    """
    if config.model.n_bits != 8:
        raise ValueError(f"the comparison assumes 8-bit images, found n_bits={config.model.n_bits}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    _, train = fashion_mnist("train", train_images)
    test_keys, test = fashion_mnist("test", test_images)
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "minutes": minutes,
            "batch_size": global_batch(config),
            "threads": threads,
            "optimizer": config.optim.optimizer,
            "lr": config.optim.lr,
            "warmup_steps": config.optim.warmup_steps,
            "schedule": config.optim.schedule,
            "min_lr_ratio": config.optim.min_lr_ratio,
            "max_grad_norm": config.optim.max_grad_norm,
            "ema_decay": config.optim.ema_decay,
            "train_images": len(train),
            "test_images": len(test),
            "eval_seed": config.eval_seed,
        },
    }
    contenders = _contenders(config, train, 60 * minutes, max_steps)
    report["settings"]["load_average_during"] = _race(contenders, minutes, log)
    report["models"] = _test_figures(contenders, config, test_keys, test)
    for name, figures in report["models"].items():
        log(f"{name}: test {figures['test_bits_per_dim']:.4f} bits/dim")
    ours, theirs = report["models"]["flowray"], report["models"]["normflows"]
    report["ratios"] = {
        "bits_per_dim_gain": theirs["test_bits_per_dim"] - ours["test_bits_per_dim"],
        "images_per_second": ours["images_per_second"] / theirs["images_per_second"],
        "params": ours["params"] / theirs["params"],
    }
    report["targets"] = {
        "flowray_bits_per_dim_at_most": TARGET_BITS_PER_DIM,
        "met": bool(ours["test_bits_per_dim"] <= TARGET_BITS_PER_DIM),
        "reference_normflows": REFERENCE_NORMFLOWS,
    }
    report["markdown"] = markdown(report)
    return report


def _contenders(
    config: TrainConfig, train: Tensor, seconds: float, max_steps: int | None
) -> dict[str, Contender]:
    """Both models, initialised on the same batch, each with flowray's recipe and its own step."""
    flow, glow = paired_models(config, train[: config.init_images])
    clip = config.optim.max_grad_norm
    steps = {
        "flowray": (flow, lambda m, b, o, g: train_step(m, b, o, max_grad_norm=clip, generator=g)),
        "normflows": (
            glow,
            lambda m, b, o, g: normflows_step(m, b, o, max_grad_norm=clip, generator=g),
        ),
    }
    return {
        name: make_contender(
            model,
            step,
            train,
            config,
            batch_size=global_batch(config),
            seconds=seconds,
            max_steps=max_steps,
        )
        for name, (model, step) in steps.items()
    }


def _race(
    contenders: dict[str, Contender], minutes: float, log: Callable[[str], None]
) -> list[float]:
    """Train the contenders in alternation; returns the load average before and after."""
    for name, contender in contenders.items():
        log(f"{name}: {parameter_count(contender.model):,} parameters")
    log(f"training both for {minutes:g} min of step time each, alternating steps")

    def progress(name: str, trainer: TimedTrainer) -> None:
        if trainer.steps % 500 == 0:
            log(
                f"  {name}: step {trainer.steps}, {trainer.elapsed:.0f} s, "
                f"train {trainer.loss:.3f} bits/dim"
            )

    load_before = os.getloadavg()[0]
    train_interleaved({name: c.trainer for name, c in contenders.items()}, progress)
    return [round(load_before, 2), round(os.getloadavg()[0], 2)]


def _test_figures(
    contenders: dict[str, Contender], config: TrainConfig, keys: list[str], test: Tensor
) -> dict[str, Any]:
    """Each model's training figures and the test bits/dim of its EMA weights (keyed noise)."""
    model = config.model
    preprocess = (
        f"logit (alpha {model.logit_alpha:g})" if model.preprocess == "logit" else model.preprocess
    )
    started = time.perf_counter()
    chunks = [
        (keys[i : i + config.eval_batch_size], test[i : i + config.eval_batch_size])
        for i in range(0, len(test), config.eval_batch_size)
    ]
    bits, count = evaluate_bits_per_dim(contenders["flowray"].ema.model, chunks, config.eval_seed)
    flowray = {
        "architecture": f"{model.levels} levels x {model.steps_per_level} steps, "
        f"{model.hidden_channels} hidden, {model.coupling} {model.mask} "
        f"coupling, {preprocess} preprocessing",
        **_figures(contenders["flowray"], global_batch(config)),
        "test_bits_per_dim": bits,
        "test_images": count,
        "eval_seconds": time.perf_counter() - started,
    }
    started = time.perf_counter()
    bits = normflows_test_bits_per_dim(
        contenders["normflows"].ema.model, keys, test, config.eval_seed
    )
    normflows = {
        "architecture": f"{model.levels} levels x {model.steps_per_level} "
        f"GlowBlocks, {model.hidden_channels} hidden, affine channel coupling (sigmoid "
        "scale), DiagGaussian bases, no logit",
        **_figures(contenders["normflows"], global_batch(config)),
        "test_bits_per_dim": bits,
        "test_images": len(test),
        "eval_seconds": time.perf_counter() - started,
    }
    return {"flowray": flowray, "normflows": normflows}


def markdown(report: dict[str, Any]) -> str:
    settings, models = report["settings"], report["models"]
    rows = [
        [
            name,
            figures["params"],
            figures["steps"],
            figures["images_seen"],
            figures["images_per_second"],
            figures["test_bits_per_dim"],
        ]
        for name, figures in models.items()
    ]
    table = markdown_table(
        ["model", "params", "steps", "images seen", "train images/s", "test bits/dim"], rows
    )
    ratios, targets = report["ratios"], report["targets"]
    verdict = "met" if targets["met"] else "missed"
    bits = models["flowray"]["test_bits_per_dim"]
    lines = [
        table,
        "",
        f"{settings['minutes']:g} min of step time each, steps alternating between the models "
        f"(load average {settings['load_average_during'][0]} before, "
        f"{settings['load_average_during'][1]} after), batch {settings['batch_size']}, "
        f"{settings['threads']} torch threads, {settings['optimizer']} lr {settings['lr']:g} "
        f"(warmup {settings['warmup_steps']}, {settings['schedule']} schedule, clip {settings['max_grad_norm']:g}, EMA "
        f"{settings['ema_decay']:g} evaluated); test bits/dim on {settings['test_images']:,} test "
        f"images (keyed dequantization noise, seed {settings['eval_seed']}), "
        f"{settings['train_images']:,} training images.",
        f"flowray vs normflows: {ratios['bits_per_dim_gain']:+.3f} bits/dim better, "
        f"{ratios['images_per_second']:.2f}x the training images/s, "
        f"{ratios['params']:.3f}x the parameters.",
        f"Target flowray <= {targets['flowray_bits_per_dim_at_most']:.2f} bits/dim: {verdict} "
        f"({bits:.3f}, {bits - targets['flowray_bits_per_dim_at_most']:+.3f}). Reference from "
        f"issue 7: normflows {REFERENCE_NORMFLOWS['bits_per_dim']} bits/dim at ~"
        f"{REFERENCE_NORMFLOWS['images_per_second']:.0f} images/s (Adamax 1e-3, no EMA).",
    ]
    machine_info = report["machine"]
    lines.append(
        f"Machine: {machine_info['cpu']}, {machine_info['cores']} cores, torch "
        f"{machine_info['torch']}, normflows {machine_info['normflows']}, load average at start "
        f"{machine_info['load_average'][0]}."
    )
    return "\n".join(lines)
