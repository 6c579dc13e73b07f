"""Pure training and evaluation steps, the optimizer and its learning-rate schedule: no Ray, no
MLflow, no I/O. The worker loop and the benchmarks both call these.
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


@dataclass(frozen=True)
class StepMetrics:
    """One step's figures on the host. `skipped`: the loss or the gradient norm was not finite
    (on any worker), so the update was not applied."""

    bits_per_dim: float
    grad_norm: float
    skipped: bool


@dataclass(frozen=True)
class StepOutcome:
    """One step's figures as 0-dim tensors on the model's device: reading them waits for the
    device to finish the step. `read()` reads all three at once; the `StepMetrics` names read
    one each."""

    loss: Tensor  # the batch's mean bits/dim (float32)
    norm: Tensor  # the gradient norm before clipping (NaN or inf when the loss was not finite)
    applied: Tensor  # bool: the update was applied (False: the step was skipped)

    def read(self) -> StepMetrics:
        return read_outcomes([self])[0]

    @property
    def bits_per_dim(self) -> float:
        return float(self.loss)

    @property
    def grad_norm(self) -> float:
        return float(self.norm)

    @property
    def skipped(self) -> bool:
        return not bool(self.applied)


def read_outcomes(outcomes: list[StepOutcome]) -> list[StepMetrics]:
    """The figures of `outcomes`, in order, in one host read."""
    if not outcomes:
        return []
    rows = torch.stack(
        [torch.stack([o.loss.float(), o.norm.float(), o.applied.float()]) for o in outcomes]
    )
    return [
        StepMetrics(bits_per_dim=bits, grad_norm=norm, skipped=not applied)
        for bits, norm, applied in rows.cpu().tolist()
    ]


def unwrap(model: nn.Module) -> Flow:
    """The Flow inside a DDP (or any `.module`) wrapper."""
    while not isinstance(model, Flow) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, Flow):
        raise TypeError(f"expected a Flow (optionally wrapped), found {type(model).__name__}")
    return model


def make_optimizer(
    params: Iterable[nn.Parameter], optim: OptimSettings, *, capturable: bool = False
) -> torch.optim.Optimizer:
    """Adam or Adamax at its peak learning rate (`set_learning_rate` warms up and decays it).
    `capturable` keeps the step count on the parameters' device, so that `train_step` can undo a
    skipped step there with no host read; its bias corrections are then float32 on the device,
    not float64 on the host (the weights differ in the last bits). Leave it False on the CPU."""
    kind = torch.optim.Adamax if optim.optimizer == "adamax" else torch.optim.Adam
    return kind(params, lr=optim.lr, weight_decay=optim.weight_decay, capturable=capturable)


def budget_progress(
    step: int, max_steps: int | None, elapsed_seconds: float, max_minutes: float | None
) -> float:
    """How much of the run's budget is spent, in [0, 1]: the larger of steps / max_steps and
    elapsed / (60 * max_minutes), so the schedule follows whichever budget binds first (a None
    budget does not count)."""
    fractions = [0.0]
    if max_steps:
        fractions.append(step / max_steps)
    if max_minutes:
        fractions.append(elapsed_seconds / (60 * max_minutes))
    return min(1.0, max(fractions))


def learning_rate(optim: OptimSettings, step: int, progress: float = 0.0) -> float:
    """The learning rate of 0-based `step` at `progress` (the budget spent, `budget_progress`):

        lr_t = lr * min(1, (t + 1) / warmup_steps) * decay(p)
        decay(p) = 1                                   "constant"
                   r + (1 - r) * (1 + cos(pi p)) / 2   "cosine"  (Loshchilov & Hutter 2017)
                   r + (1 - r) * (1 - p)               "linear"
    with r = min_lr_ratio, p clipped to [0, 1]. The rate depends on (step, progress) alone: no
    state to restore on resume, and the same value on every worker.
    """
    warmup = optim.warmup_steps
    rate = optim.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
    p = min(1.0, max(0.0, progress))
    ratio = optim.min_lr_ratio
    if optim.schedule == "cosine":
        rate *= ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p))
    elif optim.schedule == "linear":
        rate *= ratio + (1 - ratio) * (1 - p)
    return rate


def set_learning_rate(
    optimizer: torch.optim.Optimizer, optim: OptimSettings, step: int, progress: float = 0.0
) -> float:
    lr = learning_rate(optim, step, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# (model, y) -> per-image bits/dim [B]: `flow_bits_per_dim`, or its torch.compile'd form.
LossFunction = Callable[[nn.Module, Tensor], Tensor]


def flow_bits_per_dim(model: nn.Module, y: Tensor) -> Tensor:
    """Per-image bits/dim [B] (float32 at any precision) of dequantized images y through
    `model(y)`, so that a DDP wrapper sees the forward pass."""
    z, logdet = model(y, check=False)  # y is dequantize's output: in range, no device sync
    return bits_per_dim_from_log_prob(standard_normal_log_prob(z) + logdet, unwrap(model).config)


def batch_bits_per_dim(
    model: nn.Module,
    images: Tensor,
    generator: torch.Generator | None = None,
    loss: LossFunction = flow_bits_per_dim,
) -> Tensor:
    """Per-image bits/dim of uint8 images (moved to the model's device) under fresh
    dequantization noise from `generator`."""
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
    agree: Callable[[Tensor], Tensor] | None = None,
    loss: LossFunction = flow_bits_per_dim,
) -> StepOutcome:
    """One maximum-likelihood step (loss: the batch's mean bits/dim) on uint8 images
    [B, C, H, W], decided on the device with no host read. The update is applied when the loss
    and the gradient norm are both finite; otherwise the parameters and the optimizer state end
    exactly as before the step (`torch.where` between the updated and the saved values) and the
    outcome says `applied=False`. On the CPU the host reads the verdict instead and skips
    `optimizer.step()`. Under DDP, `agree` turns this worker's verdict into all workers' (an
    all-reduce MIN), so every worker applies the same steps; every worker always runs the
    backward pass, which DDP's gradient all-reduce needs."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    mean = batch_bits_per_dim(model, images, generator, loss).mean()
    mean.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    applied = torch.isfinite(mean.detach()) & torch.isfinite(norm)
    if agree is not None:
        applied = agree(applied)
    if applied.device.type == "cpu":  # reading the verdict waits for nothing
        if bool(applied):
            optimizer.step()
    else:
        with torch.no_grad():
            saved = _saved_state(optimizer, params)
            optimizer.step()
            _keep_if(applied, optimizer, saved)
    return StepOutcome(loss=mean.detach(), norm=norm.detach(), applied=applied)


# (parameter, its values before the step, its optimizer state tensors before the step)
_Saved = list[tuple[Tensor, Tensor, dict[str, Tensor]]]


def _saved_state(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> _Saved:
    """Copies of what `optimizer.step()` changes for `params`: the values and the state."""
    saved: _Saved = []
    for param in params:
        state = optimizer.state.get(param, {})
        tensors = {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
        saved.append((param, param.detach().clone(), tensors))
    return saved


def _keep_if(applied: Tensor, optimizer: torch.optim.Optimizer, saved: _Saved) -> None:
    """Where `applied` is False, put back the values and state saved before the step. State the
    step created goes back to zeros, which Adam and Adamax start their moments and count from."""
    for param, values, before in saved:
        current = param.detach()
        torch.where(applied, current, values, out=current)
        for key, now in optimizer.state[param].items():
            if not isinstance(now, Tensor):
                continue
            old = before[key] if key in before else torch.zeros_like(now)
            if now.device == applied.device:
                torch.where(applied, now, old, out=now)
            else:  # a CPU-held count beside device parameters: read through the host
                now.copy_(torch.where(applied.to(now.device), now, old))


@dataclass(frozen=True)
class Evaluation:
    """Per-image bits/dim over a validation set, summed up. `mean` is over every image, so one
    image of (numerically) zero density makes it inf: the honest figure. `nonfinite` counts those
    and `finite_mean` averages the others, telling one pathological image from a model that is
    bad everywhere."""

    total: float = 0.0  # sum of every image's bits/dim
    count: int = 0
    finite_total: float = 0.0  # sum over the finite ones
    nonfinite: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def finite_mean(self) -> float:
        finite = self.count - self.nonfinite
        return self.finite_total / finite if finite else math.nan

    def add(self, bits: Tensor) -> Evaluation:
        """With a batch's per-image bits/dim (float64) added."""
        finite = torch.isfinite(bits)
        return Evaluation(
            total=self.total + float(bits.sum()),
            count=self.count + bits.numel(),
            finite_total=self.finite_total + float(bits[finite].sum()),
            nonfinite=self.nonfinite + int((~finite).sum()),
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Sequence[str], Tensor]], seed: int = 0
) -> Evaluation:
    """Per-image bits/dim over (keys, images) batches, with keyed dequantization noise, summed
    up. Independent of batching and order, so it matches scoring to rounding."""
    flow = unwrap(model)
    was_training = flow.training
    flow.eval()
    result = Evaluation()
    for keys, images in batches:
        result = result.add(keyed_bits_per_dim(flow, keys, images, seed).double())
    flow.train(was_training)
    return result


def evaluate_bits_per_dim(
    model: nn.Module, batches: Iterable[tuple[Sequence[str], Tensor]], seed: int = 0
) -> tuple[float, int]:
    result = evaluate(model, batches, seed)
    return result.mean, result.count
