"""Where a training step's time goes, without Ray (`flowray bench step_phases`).

- phases: dequantization, forward, backward, gradient clipping, optimizer step and EMA update of
  `pipeline.train` (`make_optimizer`, the preset's model and batch), each timed on its own over
  `steps` steps on Fashion-MNIST held in memory; medians in ms.
- plain DDP: `workers` processes of one torch thread each, joined by a gloo process group on
  loopback, each running `pipeline.train.core.run_step` (the Ray Train worker's step: the finite
  check's all-reduce, DDP's gradient all-reduce, clipping, Adam, EMA) on its own slice of the
  images for `ddp_seconds`, with and without DDP's gradient sync. What Ray Train adds on top is
  the difference between this rate and the training suite's Ray 2-worker rate.

Torch, numpy and the IDX files only: no Ray, no MLflow.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowmodel import dequantize
from pipeline.bench.harness import (
    Result,
    Run,
    Table,
    fashion_mnist,
    free_port,
    median,
    preset_config,
    preset_flow,
    torch_threads,
)
from pipeline.train.config import TrainConfig
from pipeline.train.core import run_step, start_training
from pipeline.train.ema import EMA
from pipeline.train.step import flow_bits_per_dim, make_optimizer

PHASES = ("dequantize", "forward", "backward", "clip", "optimizer", "ema")


@dataclass(frozen=True)
class Settings:
    """Attributes:
    preset: the training preset (model, batch, optimizer).
    config_overrides: `key=value` changes to the preset.
    threads: torch threads for the phases.
    batch: images per step (None: the preset's per-worker batch).
    steps: steps timed for the phases.
    workers: plain DDP processes.
    ddp_seconds: seconds per plain DDP run (0: skip).
    """

    preset: str = "fashion-mnist"
    config_overrides: tuple[str, ...] = ()
    threads: int = 1
    batch: int | None = None
    steps: int = 60
    workers: int = 2
    ddp_seconds: float = 30.0


SMOKE = {
    "config_overrides": ["model.steps_per_level=1", "model.hidden_channels=8", "init_images=64"],
    "batch": 8,
    "steps": 10,
    "ddp_seconds": 1.0,
}


def phases(config: TrainConfig, images: torch.Tensor, batch: int, steps: int) -> dict[str, float]:
    """Median ms of each phase of a training step (and of the whole step, "total"), in this
    process at its current torch threads; the first fifth of the steps warm up."""
    flow = preset_flow(config.model, images[: config.init_images], config.seed)
    ema = EMA(flow, config.optim.ema_decay)
    optimizer = make_optimizer(flow.parameters(), config.optim)
    noise = torch.Generator().manual_seed(config.seed)
    clip = config.optim.max_grad_norm or math.inf  # as train_step clips
    times: dict[str, list[float]] = {name: [] for name in (*PHASES, "total")}
    for step in range(steps):
        start = step * batch % max(1, len(images) - batch)
        marks = [time.perf_counter()]
        optimizer.zero_grad(set_to_none=True)
        y = dequantize(images[start : start + batch], config.model.n_bits, noise)
        marks.append(time.perf_counter())
        loss = flow_bits_per_dim(flow, y).mean()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(list(flow.parameters()), clip)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        ema.update(flow)
        marks.append(time.perf_counter())
        if step >= steps // 5:
            for name, begin, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                times[name].append(1000 * (end - begin))
            times["total"].append(1000 * (marks[-1] - marks[0]))
    return {name: median(values) for name, values in times.items()}


def ddp_rate(
    config: TrainConfig, workers: int, batch: int, seconds: float, sync: bool = True
) -> dict[str, float]:
    """Images/s (all workers together) and median ms per step of `workers` one-thread processes
    running `run_step` under plain DDP for `seconds`; `sync=False` leaves the flow unwrapped (no
    gradient all-reduce; the finite check's all-reduce stays). Rank 0's figures."""
    results = mp.get_context("spawn").SimpleQueue()
    args = (workers, free_port(), config, batch, seconds, sync, results)
    mp.spawn(_ddp_worker, args=args, nprocs=workers)
    return results.get()


def _ddp_worker(
    rank: int,
    workers: int,
    port: int,
    config: TrainConfig,
    batch: int,
    seconds: float,
    sync: bool,
    results: Any,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers
    )
    try:
        _, images = fashion_mnist("train", limit=8192)
        flow = preset_flow(config.model, images[: config.init_images], config.seed)
        wrap = torch.nn.parallel.DistributedDataParallel if sync and workers > 1 else None
        training = start_training(flow, config, "cpu", rank=rank, wrap=wrap, say=lambda _: None)
        times: list[float] = []
        began, step, stop = time.perf_counter(), 0, False
        while not stop:
            start = (step * workers + rank) * batch % (len(images) - batch)
            tick = time.perf_counter()
            run_step(training, config, images[start : start + batch], step)
            times.append(time.perf_counter() - tick)
            step += 1
            # Every worker stops at the same step: the slowest clock decides.
            flag = torch.tensor([time.perf_counter() - began > seconds], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if rank == 0:
            per_step = median(times[len(times) // 5 :])
            rate = batch * workers / per_step
            results.put({"steps": step, "ms_per_step": 1000 * per_step, "images_per_second": rate})
    finally:
        dist.destroy_process_group()


def measure(settings: Settings, run: Run) -> Result:
    config = preset_config(settings.preset, settings.config_overrides)
    batch = settings.batch or config.batch_size
    _, images = fashion_mnist("train", limit=4096)
    with torch_threads(settings.threads):
        ms = phases(config, images, batch, settings.steps)
    report: dict[str, Any] = {
        "settings": {
            "threads": settings.threads,
            "batch": batch,
            "steps": settings.steps,
            "workers": settings.workers,
        },
        "phases_ms": ms,
    }
    total = ms["total"]
    tables = [
        Table(
            ["phase", "ms", "share"],
            [[name, ms[name], f"{ms[name] / total:.0%}"] for name in PHASES]
            + [["step", total, "100%"]],
            [
                f"One in-process step at {settings.threads} thread(s) x batch {batch}: "
                f"{batch / total * 1000:,.0f} images/s."
            ],
        )
    ]
    if settings.ddp_seconds > 0:
        report["ddp"] = {
            f"{'with' if sync else 'without'}_gradient_sync": ddp_rate(
                config, settings.workers, batch, settings.ddp_seconds, sync=sync
            )
            for sync in (True, False)
        }
        rows = [
            [
                f"{settings.workers} x 1 thread, {name.replace('_', ' ')}",
                f["ms_per_step"],
                f["images_per_second"],
            ]
            for name, f in report["ddp"].items()
        ]
        tables.append(Table(["plain torch DDP (gloo), no Ray", "ms/step", "images/s"], rows))
    return Result(report, tables)
