"""The training half of the GPU bench (pipeline.bench.gpu): its settings and report, synthetic
images, timing, and the training runs through the Ray worker's own core (pipeline.train.core)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from flowmodel import Flow, build_flow
from pipeline.train.config import TrainConfig
from pipeline.train.core import Training, run_step, start_training
from pipeline.train.distributed import check_identical_start
from pipeline.train.step import evaluate_bits_per_dim

__all__ = [
    "Report",
    "Settings",
    "base_config",
    "batches",
    "precision_race",
    "smooth_images",
    "timed",
    "train_phase",
]

PRESETS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@dataclass(frozen=True)
class Settings:
    """Sizes of one bench run: the defaults for a GPU, `toy()` for the smoke run."""

    device: torch.device
    steps: int = 400  # training steps per run
    timed_from: int = 50  # steps before this one are not timed (allocation, autotuning)
    batch_size: int = 256
    train_images: int = 20_000
    eval_images: int = 2_000
    score_images: int = 100_000
    score_batch: int = 8_192
    sweep: tuple[int, ...] = (1_024, 4_096, 16_384)
    sample_images: int = 10_000
    compile: bool = True
    small: bool = False  # a shrunken model (the smoke run)
    compile_after_seconds: float = 200.0  # the compiled run is skipped when started later
    preset: str = "rgb32"  # a jobs/configs name or a YAML path: the model and optimizer
    train_only: bool = False  # only fp32 vs bf16, interleaved (the CPU precision comparison)

    @classmethod
    def toy(cls, device: torch.device) -> Settings:
        return cls(device, 2, 1, 8, 64, 32, 64, 32, (16, 32), 8, compile=False, small=True)


@dataclass
class Report:
    """Rows of the table, and the figures behind them (for `flowray bench`'s JSON)."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, what: str, rate: float | None, bits: float | None, note: str = "") -> None:
        rate_text = f"{rate:,.0f}" if rate is not None and math.isfinite(rate) else "-"
        bits_text = f"{bits:.4f}" if bits is not None and math.isfinite(bits) else "-"
        self.rows.append((what, rate_text, bits_text, note))
        print(f"  {what}: {rate_text} images/s, {bits_text} bits/dim {note}".rstrip(), flush=True)


# ----------------------------------------------------------------------------- data and timing


def smooth_images(count: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 [count, C, H, W]: random colours on a grid of 4x4 blocks, plus a little noise."""
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    blocks = rng.integers(0, 256, (count, channels, height // 4, width // 4), dtype=np.int16)
    images = blocks.repeat(4, axis=2).repeat(4, axis=3)  # (count, C, H, W)
    images += rng.integers(-6, 7, images.shape, dtype=np.int16)
    return np.clip(images, 0, 255).astype(np.uint8)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of `work()`, with the device's queue drained before and after."""
    drain = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    drain()
    started = time.perf_counter()
    result = work()
    drain()
    return time.perf_counter() - started, result


def batches(images: np.ndarray, size: int, prefix: str) -> Iterator[tuple[list[str], torch.Tensor]]:
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        yield [f"{prefix}-{start + i}" for i in range(len(chunk))], torch.from_numpy(chunk)


# ----------------------------------------------------------------------------- training


def base_config(settings: Settings) -> TrainConfig:
    """The preset (rgb32); warmup shortened to the run's length, a smaller model in --small."""
    path = Path(settings.preset)
    preset = yaml.safe_load((path if path.suffix else PRESETS / f"{path}.yaml").read_text())
    preset["optim"]["warmup_steps"] = max(1, settings.steps // 8)
    preset["batch_size"] = settings.batch_size
    if settings.small:
        preset["model"].update(steps_per_level=1, hidden_channels=8)
    return TrainConfig.from_dict(preset)


def fresh_flow(config: TrainConfig, images: np.ndarray) -> Flow:
    """The same initialised flow every time: seeded weights, ActNorm set on the first images."""
    torch.manual_seed(config.seed)
    flow = build_flow(config.model)
    init = torch.from_numpy(images[: min(512, len(images))])
    flow.initialize(init, generator=torch.Generator().manual_seed(config.seed))
    return flow


def train_run(
    config: TrainConfig, data: dict[str, np.ndarray], settings: Settings, ddp: bool = False
) -> tuple[Training, dict[str, float]]:
    """`settings.steps` steps of the worker's core on `settings.device`; images/s over the
    timed steps, the first step's seconds (compiling, if any), and held-out EMA bits/dim."""
    device, steps = settings.device, settings.steps
    flow = fresh_flow(config, data["train"]).to(device)
    check_identical_start(flow, device)  # an all_gather of a device tensor
    wrap = None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        wrap = lambda placed: DistributedDataParallel(placed, device_ids=ids)  # noqa: E731
    training = start_training(flow, config, device, wrap=wrap)
    pool = torch.from_numpy(data["train"]).to(device)  # on the device: no copy per step
    order = torch.Generator().manual_seed(1)
    first, elapsed, losses = math.nan, 0.0, []
    for step in range(steps):
        index = torch.randint(0, len(pool), (config.batch_size,), generator=order).to(device)
        seconds, metrics = timed(device, partial(run_step, training, config, pool[index], step))
        first = seconds if step == 0 else first
        elapsed += seconds if step >= settings.timed_from else 0.0
        losses.append(metrics.bits_per_dim)
    timed_steps = steps - settings.timed_from
    bits, _ = evaluate_bits_per_dim(training.ema.model, batches(data["eval"], 500, "eval"))
    return training, {
        "images_per_second": timed_steps * config.batch_size / elapsed if elapsed else math.nan,
        "first_step_seconds": first,
        "train_bits_per_dim": float(np.mean(losses[-20:])),
        "eval_bits_per_dim": bits,
    }


def train_phase(
    data: dict[str, np.ndarray], settings: Settings, report: Report, compiled: bool = False
) -> Training | None:
    """fp32, bf16, fp32 under DDP and fp32 at 4x the batch (or, `compiled`, bf16 compiled): a row
    each. Returns the first run's Training (the fp32 one, which the checkpoint phase saves)."""
    base, first = base_config(settings), None
    runs = [("train fp32", base, False), ("train bf16", replace(base, precision="bf16"), False)]
    backend = "nccl" if settings.device.type == "cuda" else "gloo"
    runs.append((f"train fp32, DDP (world 1, {backend})", base, True))
    # A quarter of the steps at 4x the batch: what a GPU does when the batch fills it.
    big = replace(base, batch_size=4 * settings.batch_size)
    runs.append((f"train fp32, batch {big.batch_size}", big, False))
    if compiled:
        runs = [("train bf16, compiled", replace(base, precision="bf16", compile=True), False)]
    for name, config, ddp in runs:
        quarter = replace(settings, steps=max(2, settings.steps // 4), timed_from=1)
        run_settings = quarter if config.batch_size != settings.batch_size else settings
        training, figures = train_run(config, data, run_settings, ddp=ddp)
        rate, bits = figures["images_per_second"], figures["eval_bits_per_dim"]
        baseline = report.figures.setdefault("train fp32: images_per_second", rate)
        baseline_bits = report.figures.setdefault("train fp32: eval_bits_per_dim", bits)
        steps = f"{run_settings.steps} steps of batch {config.batch_size}"
        note = steps
        if name != "train fp32" and run_settings is settings:
            note = f"x{rate / baseline:.2f} of fp32; {bits - baseline_bits:+.5f} bits/dim"
        elif name != "train fp32":  # fewer steps: its bits/dim do not compare
            note = f"x{rate / baseline:.2f} of fp32 images/s; {steps}"
        if config.compile:
            note += f"; {training.loss.note}; first step {figures['first_step_seconds']:.0f} s"
        report.add(name, rate, bits, note)
        report.figures.update({f"{name}: {key}": value for key, value in figures.items()})
        first = first or training
    return first


def precision_race(data: dict[str, np.ndarray], settings: Settings, report: Report) -> None:
    """fp32 and bf16 from the same start on the same batches, their steps interleaved so that
    both see the same load (a shared machine drifts between sequential runs): the median step
    time of each (after `timed_from` steps), and held-out EMA bits/dim after `steps` steps."""
    base, device = base_config(settings), settings.device
    configs = {"fp32": base, "bf16": replace(base, precision="bf16")}
    trainings = {
        name: start_training(fresh_flow(config, data["train"]), config, device)
        for name, config in configs.items()
    }
    pool, order = torch.from_numpy(data["train"]).to(device), torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for step in range(settings.steps):
        batch = pool[torch.randint(0, len(pool), (base.batch_size,), generator=order).to(device)]
        for name, training in trainings.items():
            seconds, _ = timed(device, partial(run_step, training, configs[name], batch, step))
            times[name].append(seconds)
    rates, bits = {}, {}
    for name, training in trainings.items():
        rates[name] = base.batch_size / float(np.median(times[name][settings.timed_from :]))
        bits[name], _ = evaluate_bits_per_dim(training.ema.model, batches(data["eval"], 500, "e"))
    for name in configs:
        note = f"{settings.steps} interleaved steps of batch {base.batch_size}, median step time"
        if name == "bf16":
            note = f"x{rates['bf16'] / rates['fp32']:.2f} of fp32; {bits['bf16'] - bits['fp32']:+.5f} bits/dim"
        report.add(f"race {name}", rates[name], bits[name], note)
        report.figures.update(
            {f"race {name} images/s": rates[name], f"race {name} bits": bits[name]}
        )
