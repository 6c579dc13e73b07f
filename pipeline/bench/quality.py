"""Model quality at a fixed budget of step time: flowray's preset model against normflows' Glow.

Both race in this process (`harness.Racer`, steps alternating) with the same threads, batch, data
order, recipe and ActNorm initialisation batch; only the model differs: flowray's preset trained
by the Ray Train job's `train_step`, and normflows' Glow at the same levels, steps and width
(`normflows_glow`, parameter counts within 1%) trained by `normflows_step` (the same loss, checks
and clipping). After `minutes` of step time each: the test bits/dim of both EMA weights with the
same keyed dequantization noise and formula. The training suite races the same pair for speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowmodel import dequantize
from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table
from pipeline.model.likelihood import keyed_noise
from pipeline.train.config import TrainConfig
from pipeline.train.step import StepMetrics

TARGET_BITS_PER_DIM = 3.70  # flowray's test bits/dim at 10 minutes
LN2 = math.log(2)
# The training recipe's settings that the report repeats (config.optim's fields).
RECIPE = (
    "optimizer",
    "lr",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "max_grad_norm",
    "ema_decay",
)


def normflows_glow(levels: int, steps: int, hidden: int, image_shape: Sequence[int]) -> nn.Module:
    """normflows' multiscale Glow as its Glow example builds it: per level `steps` GlowBlocks, a
    Squeeze, a Merge between levels, and a DiagGaussian base per latent (as flowray's learned
    priors); level 0 is the coarsest. Inputs are dequantized images in [0, 1), no logit."""
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
    loss = normflows_bits_per_dim(model, dequantize(images, n_bits, generator), n_bits).mean()
    norm = torch.tensor(math.nan)
    if torch.isfinite(loss):
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    skipped = not bool(torch.isfinite(norm))
    if not skipped:
        optimizer.step()
    return StepMetrics(float(loss.detach()), float(norm), skipped=skipped)


@torch.no_grad()
def normflows_test_bits_per_dim(
    model: nn.Module, batches: Sequence[tuple[Sequence[str], Tensor]], seed: int
) -> tuple[float, int]:
    """`evaluate_bits_per_dim` for a normflows model."""
    model.eval()
    total, count = 0.0, 0
    for keys, images in batches:
        noise = keyed_noise(keys, tuple(images.shape[1:]), seed)
        total += float(normflows_bits_per_dim(model, dequantize(images, 8, noise=noise)).sum())
        count += len(keys)
    return total / count, count


def race(config: TrainConfig, images: Tensor, **options: Any) -> dict[str, harness.Racer]:
    """flowray's preset model and normflows' Glow as racers on `images`, both initialised on the
    same first `init_images`."""
    init, model = images[: config.init_images], config.model
    flow = harness.preset_flow(model, init, config.seed)
    glow = normflows_glow(
        model.levels, model.steps_per_level, model.hidden_channels, model.image_shape
    )
    with torch.no_grad():  # normflows' ActNorms initialise on the first batch they see
        noise = torch.Generator().manual_seed(config.seed)
        glow.log_prob(dequantize(init, model.n_bits, noise), None)
    normflows = {"step": normflows_step, "evaluate": normflows_test_bits_per_dim}
    return {
        "flowray": harness.Racer(flow, images, config, **options),
        "normflows": harness.Racer(glow, images, config, **normflows, **options),
    }


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the model, batch, optimizer recipe and seeds
    minutes: float = 10.0  # step time per model (the wall time is twice that, plus evaluation)
    train_images: int | None = None  # the first N (None: all)
    test_images: int | None = None  # the first N (None: all)
    max_steps: int | None = None  # also stop after this many steps
    threads: int | None = None  # torch threads for both (None: one per core)


SMOKE = {"minutes": 0.05, "train_images": 1024, "test_images": 256, "max_steps": 3}


def measure(settings: Settings, run: Run) -> Result:
    config = harness.preset_config(settings.preset)
    if config.model.n_bits != 8:
        raise ValueError(f"the comparison assumes 8-bit images, found n_bits={config.model.n_bits}")
    _, train = harness.fashion_mnist("train", settings.train_images)
    keys, test = harness.fashion_mnist("test", settings.test_images)
    with harness.torch_threads(settings.threads) as threads:
        racers = race(config, train, seconds=60 * settings.minutes, max_steps=settings.max_steps)
        for name, racer in racers.items():
            run.log(f"{name}: {racer.figures()['params']:,} parameters")
        run.log(f"training both for {settings.minutes:g} min of step time each, alternating steps")
        load = [harness.load_average()]
        harness.run_race(racers, run.log)
        load.append(harness.load_average())
        models = {name: racer.tested(keys, test) for name, racer in racers.items()}
    for name, figures in models.items():
        run.log(f"{name}: test {figures['test_bits_per_dim']:.4f} bits/dim")
    model = config.model
    logit = f"logit (alpha {model.logit_alpha:g})"
    preprocess = logit if model.preprocess == "logit" else model.preprocess
    size = f"{model.levels} levels x {model.steps_per_level}"
    models["flowray"]["architecture"] = (
        f"{size} steps, {model.hidden_channels} hidden, {model.coupling} {model.mask} coupling, "
        f"{preprocess} preprocessing"
    )
    models["normflows"]["architecture"] = (
        f"{size} GlowBlocks, {model.hidden_channels} hidden, affine channel coupling (sigmoid "
        "scale), DiagGaussian bases, no logit"
    )
    ours, theirs = models["flowray"], models["normflows"]
    figures: dict[str, Any] = {
        "settings": {
            "minutes": settings.minutes,
            "batch_size": harness.global_batch(config),
            "threads": threads,
            **{key: getattr(config.optim, key) for key in RECIPE},
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
