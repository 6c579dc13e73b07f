"""Pure training and evaluation steps, the optimizer and its warmup: no Ray, no MLflow, no I/O.
Tested in-process.

The Ray Train worker loop (`pipeline.train.worker`) and the in-process benchmarks both call these,
so what is benchmarked and tested is what runs in production.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowmodel import Flow, bits_per_dim_from_log_prob, dequantize, standard_normal_log_prob
from pipeline.model.likelihood import keyed_bits_per_dim
from pipeline.train.config import OptimSettings

__all__ = [
    "LossFunction",
    "StepMetrics",
    "batch_bits_per_dim",
    "flow_bits_per_dim",
    "evaluate_bits_per_dim",
    "make_optimizer",
    "set_learning_rate",
    "train_step",
    "unwrap",
]


@dataclass(frozen=True)
class StepMetrics:
    """What one optimisation step measured. `skipped` is True when the loss was not finite."""

    bits_per_dim: float
    grad_norm: float
    skipped: bool


def unwrap(model: nn.Module) -> Flow:
    """The Flow inside a DDP (or any `.module`) wrapper."""
    while not isinstance(model, Flow) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, Flow):
        raise TypeError(f"expected a Flow (optionally wrapped), found {type(model).__name__}")
    return model


def make_optimizer(params: Iterable[nn.Parameter], optim: OptimSettings) -> torch.optim.Optimizer:
    """Adam or Adamax, as `optim` says, at its peak learning rate (`set_learning_rate` warms up)."""
    kind = torch.optim.Adamax if optim.optimizer == "adamax" else torch.optim.Adam
    return kind(params, lr=optim.lr, weight_decay=optim.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, optim: OptimSettings, step: int) -> float:
    """Linear warmup: lr * min(1, (step + 1) / warmup_steps) for 0-based `step`; returns it."""
    warmup = optim.warmup_steps
    lr = optim.lr * min(1.0, (step + 1) / warmup) if warmup else optim.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# (model, y) -> per-image bits/dim [B]: `flow_bits_per_dim`, or its torch.compile'd form.
LossFunction = Callable[[nn.Module, Tensor], Tensor]


def flow_bits_per_dim(model: nn.Module, y: Tensor) -> Tensor:
    """Per-image bits/dim of dequantized images y through `model(y)`, so that a DDP wrapper sees
    the forward pass: [B], float32 (the log-dets and priors are float32 at any precision)."""
    z, logdet = model(y, check=False)  # y is dequantize's output: in range, no device sync
    return bits_per_dim_from_log_prob(standard_normal_log_prob(z) + logdet, unwrap(model).config)


def batch_bits_per_dim(
    model: nn.Module,
    images: Tensor,
    generator: torch.Generator | None = None,
    loss: LossFunction = flow_bits_per_dim,
) -> Tensor:
    """Per-image bits/dim of uint8 images under fresh dequantization noise from `generator`.

    The images move to the model's device first (a no-op when the loader put them there); the
    noise is drawn on the generator's device and copied to the images' (see `dequantize`).
    """
    flow = unwrap(model)
    flow._check_images(images)
    images = images.to(flow._device(), non_blocking=True)
    y = dequantize(images, flow.config.n_bits, generator, dtype=flow._dtype())
    return loss(model, y)


def train_step(
    model: nn.Module,
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None = 100.0,
    generator: torch.Generator | None = None,
    all_finite: Callable[[bool], bool] = bool,
    loss: LossFunction = flow_bits_per_dim,
) -> StepMetrics:
    """One maximum-likelihood step on a batch of uint8 images [B, C, H, W].

    The loss is the batch's mean bits/dim. A non-finite loss or gradient norm skips the update
    (the optimizer state is untouched) and reports `skipped=True`; the caller counts them.
    Under DDP, `all_finite` must turn this worker's "loss is finite" into the verdict of all
    workers (an all-reduce), so that every worker skips the same steps and none waits forever for
    a gradient all-reduce the others skipped. Gradient norms are equal on all workers after DDP's
    all-reduce, so that check needs no extra agreement.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    mean = batch_bits_per_dim(model, images, generator, loss).mean()
    if not all_finite(bool(torch.isfinite(mean))):
        return StepMetrics(bits_per_dim=float(mean.detach()), grad_norm=math.nan, skipped=True)
    mean.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepMetrics(bits_per_dim=float(mean.detach()), grad_norm=float(norm), skipped=True)
    optimizer.step()
    return StepMetrics(bits_per_dim=float(mean.detach()), grad_norm=float(norm), skipped=False)


@torch.no_grad()
def evaluate_bits_per_dim(
    model: nn.Module, batches: Iterable[tuple[Sequence[str], Tensor]], seed: int = 0
) -> tuple[float, int]:
    """Mean per-image bits/dim over (keys, images) batches, with keyed dequantization noise.

    Returns (mean, count). Independent of batching and order, so it matches scoring to rounding.
    """
    flow = unwrap(model)
    was_training = flow.training
    flow.eval()
    total, count = 0.0, 0
    for keys, images in batches:
        total += float(keyed_bits_per_dim(flow, keys, images, seed).double().sum())
        count += images.shape[0]
    flow.train(was_training)
    return (total / count if count else math.nan), count
