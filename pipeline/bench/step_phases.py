"""Where a training step's time goes, without Ray: the phases of one in-process step, and plain
torch DDP (gloo) over N local processes running the production step.

    python -m pipeline.bench.step_phases                       # fashion-mnist, 1 thread, batch 32
    python -m pipeline.bench.step_phases --threads 2 --batch 64 --ddp-seconds 0

- phases: dequantization, forward, backward, gradient clipping, optimizer step and EMA update of
  `pipeline.train` (`make_optimizer`, the preset's model and batch), each timed on its own over
  `--steps` steps on Fashion-MNIST held in memory; medians in ms.
- plain DDP: `--workers` processes of one torch thread each, joined by a gloo process group on
  loopback, each running `pipeline.train.core.run_step` (the Ray Train worker's step: the finite
  check's all-reduce, DDP's gradient all-reduce, clipping, Adam, EMA) on its own slice of the
  images for `--ddp-seconds`, with and without DDP's gradient sync. What Ray Train adds on top is
  the difference between this rate and the training suite's Ray 2-worker rate.

Torch, numpy and the IDX files only (FASHION_MNIST_DIR): no Ray, no MLflow.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.bench.common import fashion_mnist, machine, markdown_table, median
from pipeline.bench.race import initialized_flow
from pipeline.train.config import TrainConfig

__all__ = ["ddp_rate", "phases", "run"]

PHASES = ("dequantize", "forward", "backward", "clip", "optimizer", "ema")


def phases(config: TrainConfig, images: torch.Tensor, batch: int, steps: int) -> dict[str, float]:
    """Median ms of each phase of a training step (and of the whole step, "total"), in this
    process at its current torch threads; the first fifth of the steps warm up."""
    from flowmodel import dequantize
    from pipeline.train.ema import EMA
    from pipeline.train.step import flow_bits_per_dim, make_optimizer

    flow = initialized_flow(config, images[: config.init_images])
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
    with socket.socket() as probe:  # a free loopback port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(
        _ddp_worker,
        args=(workers, port, config, batch, seconds, sync, results),
        nprocs=workers,
    )
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
    from pipeline.train.core import run_step, start_training

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers
    )
    try:
        _, images = fashion_mnist("train", limit=8192)
        flow = initialized_flow(config, images[: config.init_images])
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
            results.put(
                {
                    "steps": step,
                    "ms_per_step": 1000 * per_step,
                    "images_per_second": batch * workers / per_step,
                }
            )
    finally:
        dist.destroy_process_group()


def run(
    config: TrainConfig,
    *,
    threads: int = 1,
    batch: int | None = None,
    steps: int = 60,
    workers: int = 2,
    ddp_seconds: float = 30.0,
) -> dict[str, Any]:
    """The phases at `threads` x `batch` (default: the preset's per-worker batch), then plain DDP
    with and without gradient sync (skipped when `ddp_seconds` is 0)."""
    batch = batch or config.batch_size
    torch.set_num_threads(threads)
    _, images = fashion_mnist("train", limit=4096)
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {"threads": threads, "batch": batch, "steps": steps, "workers": workers},
        "phases_ms": phases(config, images, batch, steps),
    }
    if ddp_seconds > 0:
        report["ddp"] = {
            "with_gradient_sync": ddp_rate(config, workers, batch, ddp_seconds, sync=True),
            "without_gradient_sync": ddp_rate(config, workers, batch, ddp_seconds, sync=False),
        }
    report["markdown"] = markdown(report)
    return report


def markdown(report: dict[str, Any]) -> str:
    settings, ms = report["settings"], report["phases_ms"]
    total = ms["total"]
    lines = [
        markdown_table(
            ["phase", "ms", "share"],
            [[name, ms[name], f"{ms[name] / total:.0%}"] for name in PHASES]
            + [["step", total, "100%"]],
        ),
        "",
        f"One in-process step at {settings['threads']} thread(s) x batch {settings['batch']}: "
        f"{settings['batch'] / total * 1000:,.0f} images/s.",
    ]
    if "ddp" in report:
        rows = [
            [
                f"{settings['workers']} x 1 thread, {name.replace('_', ' ')}",
                r["ms_per_step"],
                r["images_per_second"],
            ]
            for name, r in report["ddp"].items()
        ]
        lines += [
            "",
            markdown_table(["plain torch DDP (gloo), no Ray", "ms/step", "images/s"], rows),
        ]
    info = report["machine"]
    lines += [
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average'][0]}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion-mnist", help="training preset (or YAML)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the phases")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's batch_size")
    parser.add_argument("--steps", type=int, default=60, help="steps timed for the phases")
    parser.add_argument("--workers", type=int, default=2, help="plain DDP processes")
    parser.add_argument(
        "--ddp-seconds", type=float, default=30.0, help="seconds per plain DDP run (0: skip)"
    )
    args = parser.parse_args(argv)
    config = load_config(TrainConfig, args.config)
    report = run(
        config,
        threads=args.threads,
        batch=args.batch,
        steps=args.steps,
        workers=args.workers,
        ddp_seconds=args.ddp_seconds,
    )
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
