"""Model quality at a fixed wall-clock budget: flowray's preset model versus normflows' Glow.

    report = run(config, minutes=10)      # config: the `fashion-mnist` TrainConfig preset
    print(report["markdown"])

Both models are trained in this process by the same plain torch loop
(`pipeline.bench.common.make_contender` on a `TimedTrainer`): the same cores and threads, the same
batch size and data order (one seeded permutation of the training split per epoch), the same recipe
(the preset's optimizer, learning-rate warmup, gradient clipping and EMA, from `pipeline.train` as
the Ray Train loop uses them), the same data-dependent ActNorm initialisation batch. Only the model
differs:

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

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from flowmodel import build_flow, dequantize
from pipeline.bench.common import (
    Contender,
    TimedTrainer,
    fashion_mnist,
    machine,
    make_contender,
    markdown_table,
    normflows_bits_per_dim,
    normflows_glow,
    parameter_count,
    train_interleaved,
)
from pipeline.model.likelihood import keyed_noise
from pipeline.train.config import TrainConfig
from pipeline.train.step import StepMetrics, evaluate_bits_per_dim, train_step

__all__ = [
    "REFERENCE_NORMFLOWS",
    "TARGET_BITS_PER_DIM",
    "markdown",
    "normflows_step",
    "normflows_test_bits_per_dim",
    "run",
]

TARGET_BITS_PER_DIM = 3.70  # issue 7: flowray at 10 minutes
# Issue 7's reference: normflows (2 levels, 8 steps, 64 hidden, Adamax 1e-3, batch 64) after 10
# minutes on this machine.
REFERENCE_NORMFLOWS = {"bits_per_dim": 3.95, "images_per_second": 400.0}


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
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    _, train = fashion_mnist("train", train_images)
    test_keys, test = fashion_mnist("test", test_images)
    init_batch = train[: config.init_images]
    model_config = config.model
    if model_config.n_bits != 8:
        raise ValueError(f"the comparison assumes 8-bit images, found n_bits={model_config.n_bits}")
    seconds = 60 * minutes
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "minutes": minutes,
            "batch_size": config.batch_size,
            "threads": threads,
            "optimizer": config.optim.optimizer,
            "lr": config.optim.lr,
            "warmup_steps": config.optim.warmup_steps,
            "max_grad_norm": config.optim.max_grad_norm,
            "ema_decay": config.optim.ema_decay,
            "train_images": len(train),
            "test_images": len(test),
            "eval_seed": config.eval_seed,
        },
    }

    # flowray: the preset's model, initialised as the Ray Train job does.
    torch.manual_seed(config.seed)
    flow = build_flow(model_config)
    flow.initialize(init_batch, generator=torch.Generator().manual_seed(config.seed))
    # normflows: same levels, steps and width; its ActNorms initialise on their first batch, so
    # give them the same one.
    glow = normflows_glow(
        model_config.levels,
        model_config.steps_per_level,
        model_config.hidden_channels,
        model_config.image_shape,
    )
    with torch.no_grad():
        glow.log_prob(dequantize(init_batch, 8, torch.Generator().manual_seed(config.seed)), None)
    clip = config.optim.max_grad_norm
    contenders = {
        "flowray": make_contender(
            flow,
            lambda m, b, o, g: train_step(m, b, o, max_grad_norm=clip, generator=g),
            train,
            config,
            batch_size=config.batch_size,
            seconds=seconds,
            max_steps=max_steps,
        ),
        "normflows": make_contender(
            glow,
            lambda m, b, o, g: normflows_step(m, b, o, max_grad_norm=clip, generator=g),
            train,
            config,
            batch_size=config.batch_size,
            seconds=seconds,
            max_steps=max_steps,
        ),
    }
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
    report["settings"]["load_average_during"] = [
        round(load_before, 2),
        round(os.getloadavg()[0], 2),
    ]

    models: dict[str, Any] = {}
    started = time.perf_counter()
    chunks = [
        (test_keys[i : i + config.eval_batch_size], test[i : i + config.eval_batch_size])
        for i in range(0, len(test), config.eval_batch_size)
    ]
    bits, count = evaluate_bits_per_dim(contenders["flowray"].ema.model, chunks, config.eval_seed)
    models["flowray"] = {
        "architecture": f"{model_config.levels} levels x {model_config.steps_per_level} steps, "
        f"{model_config.hidden_channels} hidden, {model_config.coupling} {model_config.mask} "
        f"coupling, {model_config.preprocess} preprocessing",
        **_figures(contenders["flowray"], config.batch_size),
        "test_bits_per_dim": bits,
        "test_images": count,
        "eval_seconds": time.perf_counter() - started,
    }
    started = time.perf_counter()
    bits = normflows_test_bits_per_dim(
        contenders["normflows"].ema.model, test_keys, test, config.eval_seed
    )
    models["normflows"] = {
        "architecture": f"{model_config.levels} levels x {model_config.steps_per_level} "
        f"GlowBlocks, {model_config.hidden_channels} hidden, affine channel coupling (sigmoid "
        "scale), DiagGaussian bases, no logit",
        **_figures(contenders["normflows"], config.batch_size),
        "test_bits_per_dim": bits,
        "test_images": len(test),
        "eval_seconds": time.perf_counter() - started,
    }
    for name, figures in models.items():
        log(f"{name}: test {figures['test_bits_per_dim']:.4f} bits/dim")
    report["models"] = models

    ours, theirs = models["flowray"], models["normflows"]
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
        f"(warmup {settings['warmup_steps']}, clip {settings['max_grad_norm']:g}, EMA "
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
