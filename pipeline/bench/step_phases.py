"""Where a training step's time goes, without Ray (`flowray bench step_phases`): each phase of
`pipeline.train`'s step (the preset's model, batch and optimizer) timed on its own, medians in ms;
and `workers` one-thread processes in a gloo process group running the Ray Train worker's
`run_step` under plain DDP, with and without the gradient sync. What Ray Train adds on top is the
difference between this rate and the training suite's Ray 2-worker rate. No Ray, no MLflow.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowmodel import dequantize
from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table
from pipeline.train.config import TrainConfig
from pipeline.train.core import run_step, start_training
from pipeline.train.ema import EMA
from pipeline.train.step import flow_bits_per_dim, make_optimizer

PHASES = ("dequantize", "forward", "backward", "clip", "optimizer", "ema")


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the model, batch and optimizer
    config_overrides: tuple[str, ...] = ()  # `key=value` changes to the preset
    threads: int = 1  # torch threads for the phases
    batch: int | None = None  # images per step (None: the preset's per-worker batch)
    steps: int = 60  # timed for the phases
    workers: int = 2  # plain DDP processes
    ddp_seconds: float = 30.0  # per plain DDP run (0: skip)


SMOKE = {
    "config_overrides": ["model.steps_per_level=1", "model.hidden_channels=8", "init_images=64"],
    "batch": 8,
    "steps": 10,
    "ddp_seconds": 1.0,
}


def phases(config: TrainConfig, images: torch.Tensor, batch: int, steps: int) -> dict[str, float]:
    """Median ms of each phase of a training step and of the whole ("total"); the first fifth of
    the steps warm up."""
    flow = harness.preset_flow(config.model, images[: config.init_images], config.seed)
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
    return {name: harness.median(values) for name, values in times.items()}


def ddp_rate(
    config: TrainConfig, workers: int, batch: int, seconds: float, sync: bool = True
) -> dict[str, float]:
    """Images/s (all workers) and median ms per step (rank 0's) of `workers` one-thread processes
    running `run_step` for `seconds`; `sync=False` leaves the flow unwrapped (no gradient
    all-reduce; the finite check's all-reduce stays)."""
    results = mp.get_context("spawn").SimpleQueue()
    args = (workers, harness.free_port(), config, batch, seconds, sync, results)
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
        _, images = harness.fashion_mnist("train", limit=8192)
        flow = harness.preset_flow(config.model, images[: config.init_images], config.seed)
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
            per_step = harness.median(times[len(times) // 5 :])
            rate = batch * workers / per_step
            results.put({"steps": step, "ms_per_step": 1000 * per_step, "images_per_second": rate})
    finally:
        dist.destroy_process_group()


def measure(settings: Settings, run: Run) -> Result:
    config = harness.preset_config(settings.preset, settings.config_overrides)
    batch = settings.batch or config.batch_size
    _, images = harness.fashion_mnist("train", limit=4096)
    with harness.torch_threads(settings.threads):
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
        run_ddp = partial(ddp_rate, config, settings.workers, batch, settings.ddp_seconds)
        report["ddp"] = {f"{w}_gradient_sync": run_ddp(w == "with") for w in ("with", "without")}
        what = f"{settings.workers} x 1 thread"
        rows = [
            [f"{what}, {name.replace('_', ' ')}", f["ms_per_step"], f["images_per_second"]]
            for name, f in report["ddp"].items()
        ]
        tables.append(Table(["plain torch DDP (gloo), no Ray", "ms/step", "images/s"], rows))
    return Result(report, tables)
