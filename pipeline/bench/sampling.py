"""Sampling: `flowray sample` (Ray tasks, PNG shards) against the in-process inverse pass.

Figures (medians over repeats, side by side in one process and one Ray):
- in-process inverse pass: `Flow.sample` on chunks of the job's chunk size with per-chunk seeded
  generators, torch using every core, uint8 images in memory: no Ray, no PNG, no files. The
  ceiling for sampling.
- `flowray sample`: `pipeline.batch.sampling.generate` end to end (model resolution, tasks, PNG
  coding, shards, grid, manifest) over its whole wall time, and its draw phase alone
  (`SampleResult.images_per_second`: tasks and shards).

The model is the preset's at its data-dependent initialisation (throughput does not depend on
training).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pipeline.bench.harness import (
    Result,
    Run,
    Table,
    local_ray,
    median,
    saved_preset_model,
    timed,
    torch_threads,
)
from pipeline.config import load_config
from pipeline.train.config import TrainConfig

__all__ = ["SMOKE", "Settings", "measure"]


@dataclass(frozen=True)
class Settings:
    """Attributes:
    preset: the training preset whose model samples.
    images: images per run.
    repeats: runs; medians reported.
    """

    preset: str = "fashion-mnist"
    images: int = 10_000
    repeats: int = 3


SMOKE = {"images": 64, "repeats": 1}


def _in_process(model_dir: str, images: int, chunk_size: int, temperature: float) -> float:
    """Images/s of Flow.sample over `images` in chunks, every core, this process."""
    from pipeline.batch.sampling import chunk_seed
    from pipeline.model.artifact import load_flow

    flow = load_flow(model_dir)

    def draw() -> None:
        for index in range(math.ceil(images / chunk_size)):
            count = min(chunk_size, images - index * chunk_size)
            flow.sample(count, temperature, torch.Generator().manual_seed(chunk_seed(0, index)))

    with torch_threads(None):
        seconds, _ = timed(draw)
    return images / seconds


def measure(settings: Settings, run: Run) -> Result:
    """The figures in the module docstring; medians over `repeats`."""
    from pipeline.batch.sampling import SampleConfig, generate

    defaults = SampleConfig(model="-", output="-")
    figures: dict[str, list[float]] = {"in_process": [], "job": [], "job_draw": []}
    run.workdir.mkdir(parents=True, exist_ok=True)
    model = saved_preset_model(run.workdir, load_config(TrainConfig, settings.preset).model)
    with local_ray():
        for _ in range(settings.repeats):
            figures["in_process"].append(
                _in_process(model, settings.images, defaults.chunk_size, defaults.temperature)
            )
            config = SampleConfig(
                model=model,
                output=str(run.workdir / f"samples-{time.monotonic_ns()}"),
                n=settings.images,
                tracking_uri=f"sqlite:///{run.workdir / 'mlflow.db'}",
                log_to_mlflow=False,
            )
            seconds, result = timed(lambda config=config: generate(config))
            figures["job"].append(settings.images / seconds)
            figures["job_draw"].append(result.images_per_second)
    results = {name: median(values) for name, values in figures.items()}
    report = {
        "images": settings.images,
        "repeats": settings.repeats,
        "chunk_size": defaults.chunk_size,
        "results": results,
        "ratio": results["job"] / results["in_process"],
        "ratio_draw": results["job_draw"] / results["in_process"],
    }
    images = settings.images
    table = Table(
        ["measurement", "images", "images/s (median)", "vs in-process"],
        [
            ["in-process inverse pass (all cores, no PNG)", images, results["in_process"], 1.0],
            ["flowray sample, end to end", images, results["job"], report["ratio"]],
            ["flowray sample, draw phase", images, results["job_draw"], report["ratio_draw"]],
        ],
        [f"Median of {settings.repeats} runs; chunks of {defaults.chunk_size} images."],
    )
    return Result(report, [table])
