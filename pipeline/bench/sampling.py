"""Sampling: `flowray sample` (Ray tasks, PNG shards) against the in-process inverse pass.

The in-process inverse pass (`Flow.sample` on the job's chunks and seeds, every core, no Ray,
PNG or files) is the ceiling; `flowray sample` (`pipeline.batch.sampling.generate`) is timed end to
end and by its draw phase alone (tasks and shards). The model is the preset's at its
initialisation (throughput does not depend on training).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the training preset whose model samples
    images: int = 10_000  # per run
    repeats: int = 3  # medians reported


SMOKE = {"images": 64, "repeats": 1}


def measure(settings: Settings, run: Run) -> Result:
    from pipeline.batch.sampling import SampleConfig, chunk_seed, generate
    from pipeline.model.artifact import load_flow

    defaults = SampleConfig(model="-", output="-")
    chunk, temperature = defaults.chunk_size, defaults.temperature
    model = harness.saved_preset_model(run.workdir, settings.preset)
    flow, images = load_flow(model), settings.images

    def in_process() -> None:
        for index in range(math.ceil(images / chunk)):
            count = min(chunk, images - index * chunk)
            flow.sample(count, temperature, torch.Generator().manual_seed(chunk_seed(0, index)))

    repeats: list[dict[str, float]] = []
    with harness.local_ray():
        for _ in range(settings.repeats):
            with harness.torch_threads(None):
                own = images / harness.timed(in_process)[0]
            config = SampleConfig(
                model=model,
                output=str(run.workdir / f"samples-{time.monotonic_ns()}"),
                n=images,
                tracking_uri=f"sqlite:///{run.workdir / 'mlflow.db'}",
                log_to_mlflow=False,
            )
            seconds, result = harness.timed(lambda config=config: generate(config))
            job = {"job": images / seconds, "job_draw": result.images_per_second}
            repeats.append({"in_process": own, **job})
    results = harness.medians(repeats)
    ratio, ratio_draw = (results[k] / results["in_process"] for k in ("job", "job_draw"))
    table = Table(
        ["measurement", "images", "images/s (median)", "vs in-process"],
        [
            ["in-process inverse pass (all cores, no PNG)", images, results["in_process"], 1.0],
            ["flowray sample, end to end", images, results["job"], ratio],
            ["flowray sample, draw phase", images, results["job_draw"], ratio_draw],
        ],
        [f"Median of {settings.repeats} runs; chunks of {chunk} images."],
    )
    report = {"images": images, "repeats": settings.repeats, "chunk_size": chunk}
    report |= {"results": results, "ratio": ratio, "ratio_draw": ratio_draw}
    return Result(report, [table])
