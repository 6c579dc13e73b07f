"""The training core, Ray-free: a flow placed on its device with its EMA, optimizer and noise
generator, and one step of it. The Ray Train worker loop and the GPU bench both run exactly this.

Everything a step touches lives on `Training.device`: the flow is moved there first, the EMA is
copied from the placed flow, the optimizer is made for (and a restored state loaded onto) the
placed parameters (capturable off the CPU, so its step count is there too), and the noise
generator lives there. A step never waits for the device: `run_step` returns its figures as
device tensors that the caller reads when it chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowmodel import Flow
from pipeline.train.checkpoint import TrainState
from pipeline.train.config import TrainConfig
from pipeline.train.distributed import all_agree_on_device
from pipeline.train.ema import EMA
from pipeline.train.step import (
    LossFunction,
    StepOutcome,
    flow_bits_per_dim,
    make_optimizer,
    set_learning_rate,
    train_step,
    unwrap,
)


class StepLoss:
    """The training step's loss: `flow_bits_per_dim`, torch.compile'd when asked. Compiling
    happens at the first call; if it fails, `run_step` falls back to eager for the rest of the
    run and says so in one line. `note` tells which one runs.
    """

    def __init__(
        self,
        compile: bool,
        backend: str | Callable[..., Any] = "inductor",
        say: Callable[[str], None] = print,
    ) -> None:
        self.eager: LossFunction = flow_bits_per_dim
        self.compiled: LossFunction | None = None
        self.proven = False  # the compiled step has run once: later errors are real errors
        self.say = say
        self.note = "training step: eager (compile: false)"
        if compile:
            try:
                self.compiled = torch.compile(flow_bits_per_dim, backend=backend)
                self.note = "training step: torch.compile (compiles at the first step)"
            except Exception as err:  # no compiler support on this platform or Python
                self.fall_back(err)

    def fall_back(self, err: BaseException) -> None:
        self.compiled = None
        self.note = f"training step: eager (torch.compile failed: {_cause(err)})"
        self.say(self.note)


def _cause(err: BaseException) -> str:
    """`Type: first line`, and the root cause's (dynamo wraps the backend's own error in one
    whose first line says only who raised)."""

    def line(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"

    root = getattr(err, "inner_exception", None) or err
    while root.__cause__ is not None:
        root = root.__cause__
    return line(err) if root is err else f"{line(err)} <- {line(root)}"


@dataclass
class Training:
    model: nn.Module  # the flow, wrapped (DDP) when there are several workers
    optimizer: torch.optim.Optimizer
    ema: EMA[Flow]  # the Polyak average: evaluated, checkpointed and shipped, in float32
    generator: torch.Generator  # this worker's training dequantization noise
    device: torch.device
    loss: StepLoss

    @property
    def flow(self) -> Flow:
        return unwrap(self.model)


def start_training(
    flow: Flow,
    config: TrainConfig,
    device: torch.device | str,
    *,
    rank: int = 0,
    wrap: Callable[[Flow], nn.Module] | None = None,
    restored: tuple[Flow, TrainState] | None = None,
    say: Callable[[str], None] = print,
) -> Training:
    """Place the initialised `flow` on `device` at `config.precision`, wrap it (`wrap`: DDP), and
    make its EMA, optimizer and noise generator there; `restored` (a checkpoint's EMA flow and
    state, on any device) continues a run."""
    device = torch.device(device)
    flow = flow.to(device).set_precision(config.precision)
    model = wrap(flow) if wrap is not None else flow
    ema = EMA(flow, config.optim.ema_decay)
    ema.model.set_precision("fp32")
    capturable = device.type != "cpu"
    optimizer = make_optimizer(model.parameters(), config.optim, capturable=capturable)
    step = 0
    if restored is not None:
        ema_flow, saved = restored
        ema.load_state_dict({"model": ema_flow.state_dict(), "updates": saved.ema_updates})
        # Optimizer.load_state_dict casts each state tensor to its parameter's device and dtype.
        optimizer.load_state_dict(saved.optimizer)
        _keep_capturable(optimizer, capturable)
        step = saved.step
    # Each worker draws its own noise, and a resumed run does not replay what it used. On a
    # device type without generators it is drawn on the CPU, from which `dequantize` copies it.
    seed = config.seed * 1000 + rank + step
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        generator = torch.Generator().manual_seed(seed)
    loss = StepLoss(config.compile, say=say)
    return Training(model, optimizer, ema, generator, device, loss)


def _keep_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """A loaded state brings the saving run's `capturable`: set this run's, with each step count
    where it then belongs (beside its parameter, or on the CPU)."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if isinstance(step, Tensor):
                state["step"] = step.to(param.device if capturable else torch.device("cpu"))


def run_step(
    training: Training, config: TrainConfig, images: Tensor, step: int, progress: float = 0.0
) -> StepOutcome:
    """Step `step` (0-based): the learning rate at `progress` (`budget_progress`, equal on all
    workers), one `train_step` on `images` (any device) that every worker agrees to apply or
    skip, then the EMA update (a skipped step leaves it). Nothing here reads the device."""
    set_learning_rate(training.optimizer, config.optim, step, progress)
    outcome = _step(training, config, images)
    training.ema.update(training.flow, outcome.applied)
    return outcome


def _step(training: Training, config: TrainConfig, images: Tensor) -> StepOutcome:
    def step(loss: LossFunction) -> StepOutcome:
        return train_step(
            training.model,
            images,
            training.optimizer,
            max_grad_norm=config.optim.max_grad_norm,
            generator=training.generator,
            agree=lambda applied: all_agree_on_device(applied, dist.ReduceOp.MIN),
            loss=loss,
        )

    loss = training.loss
    if loss.compiled is not None and not loss.proven:
        try:
            outcome = step(loss.compiled)
        except Exception as err:  # compiling (forward or backward) failed: this step runs eager
            loss.fall_back(err)
        else:
            loss.proven = True
            return outcome
    return step(loss.compiled or loss.eager)
