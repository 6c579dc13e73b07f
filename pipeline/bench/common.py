"""Helpers shared by the benchmark suites: data, the normflows peer model, timing, memory, tables.

Numbers from this machine are only meaningful side by side (it is shared and noisy), so every
suite reports medians and ratios, and every report carries `machine()`: CPU, cores, versions,
threads and the load average when it started.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.train.config import TrainConfig
from pipeline.train.ema import EMA
from pipeline.train.step import StepMetrics, make_optimizer, set_learning_rate

__all__ = [
    "Contender",
    "fashion_mnist",
    "finite_positive",
    "machine",
    "make_contender",
    "markdown_table",
    "median",
    "normflows_bits_per_dim",
    "normflows_glow",
    "parameter_count",
    "RssSampler",
    "TimedTrainer",
    "train_interleaved",
]

LN2 = math.log(2)


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on. The load average shows how busy the shared machine was."""
    import ray

    try:
        from importlib.metadata import version

        normflows_version = version("normflows")
    except Exception:  # not installed: the suites that need it say so themselves
        normflows_version = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "normflows": normflows_version,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 4 significant decimals, large numbers a separator."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if not math.isfinite(value):
                return "n/a"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data


def fashion_mnist(split: str, limit: int | None = None) -> tuple[list[str], Tensor]:
    """Keys and uint8 images [N, 1, 28, 28] of a Fashion-MNIST split (FASHION_MNIST_DIR).

    Keys are the ones `prepare` writes into shards ("test-00000042"), so keyed dequantization
    noise here equals the scoring job's for the same image.
    """
    from pipeline.data.shards import shard_key
    from pipeline.data.sources import open_source

    source = open_source("idx:")
    count = source.splits()[split] if limit is None else min(limit, source.splits()[split])
    images = [item.image for item in source.read(split, range(count))]
    keys = [shard_key(split, index) for index in range(count)]
    return keys, torch.from_numpy(np.stack(images))  # (N, 1, 28, 28)


# ----------------------------------------------------------------------------- normflows


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


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- timing


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
    that was not skipped, seeded dequantization noise and batch order."""
    optimizer = make_optimizer(model.parameters(), config.optim)
    generator = torch.Generator().manual_seed(config.seed)  # dequantization noise

    def one(batch: Tensor, index: int) -> float:
        set_learning_rate(optimizer, config.optim, index)
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


# ----------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                # The name (field 2) may hold spaces; the parent pid follows its closing paren.
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def _tree(root: int) -> list[int]:
    children, pids, stack = _children_map(), [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; PSS counts shared pages (Ray's object store) once overall."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class RssSampler:
    """Peak memory of this process and all its descendants (the Ray processes a local
    `ray.init()` starts: GCS, raylet, workers), sampled from /proc every `interval` seconds.

    peak_rss_mb sums each process's RSS (shared pages counted in every process that maps them);
    peak_pss_mb sums PSS (shared pages split between them), the closer measure of what the job uses.
    Linux only; elsewhere both stay NaN.
    """

    def __init__(self, interval: float = 0.5, root: int | None = None) -> None:
        self.interval = interval
        self.root = root or os.getpid()
        self.peak_rss_mb = math.nan
        self.peak_pss_mb = math.nan
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        if not os.path.isdir("/proc"):
            return
        pids = _tree(self.root)
        rss = pss = 0
        for pid in pids:
            r, p = _memory_kb(pid)
            rss, pss = rss + r, pss + p
        self.processes = max(self.processes, len(pids))
        self.peak_rss_mb = max(rss / 1024, 0 if math.isnan(self.peak_rss_mb) else self.peak_rss_mb)
        self.peak_pss_mb = max(pss / 1024, 0 if math.isnan(self.peak_pss_mb) else self.peak_pss_mb)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
