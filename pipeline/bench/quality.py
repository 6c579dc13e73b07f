"""Model quality at a fixed budget of step time: flowray's preset model against normflows' Glow.

Both race in this process (`harness.Racer`, steps alternating): the same threads, batch, data
order, recipe and ActNorm initialisation batch; only the model differs:

- flowray: `build_flow(config.model)` trained with `pipeline.train.step.train_step`, the step the
  Ray Train job runs.
- normflows: `MultiscaleFlow` of GlowBlock / Squeeze / Merge with DiagGaussian bases at the same
  levels, steps and width (`normflows_glow`, parameter counts within 1%), inputs in [0, 1), trained
  by `normflows_step`: the same loss, checks and clipping.

Each trains for `minutes` of its own step time; then the test bits/dim of both models' EMA
weights, with the same keyed dequantization noise: the same y = (x + u) / 256 for an image in both
models, bits/dim by the same formula. The training suite races the same pair for throughput.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowmodel import dequantize
from pipeline.bench.harness import (
    Racer,
    Result,
    Run,
    Table,
    fashion_mnist,
    global_batch,
    load_average,
    preset_config,
    preset_flow,
    run_race,
    torch_threads,
)
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
    """`evaluate_bits_per_dim` for a normflows model: (mean bits/dim, image count), keyed noise."""
    model.eval()
    total, count = 0.0, 0
    for keys, images in batches:
        noise = keyed_noise(keys, tuple(images.shape[1:]), seed)
        total += float(normflows_bits_per_dim(model, dequantize(images, 8, noise=noise)).sum())
        count += len(keys)
    return total / count, count


def race(config: TrainConfig, images: Tensor, **options: Any) -> dict[str, Racer]:
    """flowray's preset model and normflows' Glow as racers on `images` (`options` go to `Racer`),
    both initialised on the same first `init_images` (normflows' ActNorms on the first batch they
    see)."""
    init, model = images[: config.init_images], config.model
    flow = preset_flow(model, init, config.seed)
    glow = normflows_glow(
        model.levels, model.steps_per_level, model.hidden_channels, model.image_shape
    )
    with torch.no_grad():
        noise = torch.Generator().manual_seed(config.seed)
        glow.log_prob(dequantize(init, model.n_bits, noise), None)
    normflows = {"step": normflows_step, "evaluate": normflows_test_bits_per_dim}
    return {
        "flowray": Racer(flow, images, config, **options),
        "normflows": Racer(glow, images, config, **normflows, **options),
    }


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


def measure(settings: Settings, run: Run) -> Result:
    config = preset_config(settings.preset)
    if config.model.n_bits != 8:
        raise ValueError(f"the comparison assumes 8-bit images, found n_bits={config.model.n_bits}")
    _, train = fashion_mnist("train", settings.train_images)
    keys, test = fashion_mnist("test", settings.test_images)
    with torch_threads(settings.threads) as threads:
        racers = race(config, train, seconds=60 * settings.minutes, max_steps=settings.max_steps)
        for name, racer in racers.items():
            run.log(f"{name}: {racer.figures()['params']:,} parameters")
        run.log(f"training both for {settings.minutes:g} min of step time each, alternating steps")
        load = [load_average()]
        run_race(racers, run.log)
        load.append(load_average())
        models = {name: racer.tested(keys, test) for name, racer in racers.items()}
    for name, figures in models.items():
        run.log(f"{name}: test {figures['test_bits_per_dim']:.4f} bits/dim")
    model = config.model
    preprocess = model.preprocess
    if preprocess == "logit":
        preprocess = f"logit (alpha {model.logit_alpha:g})"
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
            "batch_size": global_batch(config),
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
