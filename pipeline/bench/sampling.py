"""Sampling benchmark: `flowray sample` (Ray tasks, PNG shards) against the in-process inverse pass.

    python -m pipeline.bench.sampling                        # 10,000 images, 3 repeats
    python -m pipeline.bench.sampling --images 2000 --repeats 1

Figures (medians over repeats, side by side in one process, one Ray instance):
- in-process inverse pass: `Flow.sample` on chunks of the job's chunk size with per-chunk seeded
  generators, torch using every core, uint8 images in memory: no Ray, no PNG, no files. The
  ceiling for sampling.
- `flowray sample`: `pipeline.batch.sampling.generate` end to end (model resolution, tasks,
  PNG coding, shards, grid, manifest), counted over its whole wall time, and its draw phase alone
  (`SampleResult.images_per_second`: tasks and shards, no model resolution or grid).

The model is the default FlowConfig at its data-dependent initialisation, as in the scoring suite
(throughput does not depend on training).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.common import machine, markdown_table, median

__all__ = ["main", "run"]


def _in_process(model_dir: str, images: int, chunk_size: int, temperature: float) -> float:
    """Images/s of Flow.sample over `images` in chunks, every core, this process."""
    from pipeline.batch.sampling import chunk_seed
    from pipeline.model.artifact import load_flow

    flow = load_flow(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        started = time.perf_counter()
        for index in range(math.ceil(images / chunk_size)):
            count = min(chunk_size, images - index * chunk_size)
            generator = torch.Generator().manual_seed(chunk_seed(0, index))
            flow.sample(count, temperature, generator)
        return images / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def _job(model_dir: str, output: Path, images: int) -> tuple[float, float]:
    """`flowray sample` of `images` into `output`: (images/s end to end, of the draw phase)."""
    from pipeline.batch.sampling import SampleConfig, generate

    config = SampleConfig(
        model=model_dir,
        output=str(output),
        n=images,
        tracking_uri=f"sqlite:///{output.parent / 'mlflow.db'}",
        log_to_mlflow=False,
    )
    started = time.perf_counter()
    result = generate(config)
    return images / (time.perf_counter() - started), result.images_per_second


def run(images: int = 10_000, repeats: int = 3, workdir: str | None = None) -> dict[str, Any]:
    """Measure the figures in the module docstring; medians over `repeats`.

    Returns:
        {"images", "repeats", "chunk_size", "machine", "results": {"in_process", "job",
         "job_draw"} (images/s), "ratio", "ratio_draw", "markdown"}.
    """
    from pipeline.batch.sampling import SampleConfig
    from pipeline.bench.scoring import _local_ray, _model

    defaults = SampleConfig(model="-", output="-")
    figures: dict[str, list[float]] = {"in_process": [], "job": [], "job_draw": []}
    with ExitStack() as stack:
        base = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        _local_ray(stack)
        model = _model(None, base)
        for _ in range(repeats):
            figures["in_process"].append(
                _in_process(model, images, defaults.chunk_size, defaults.temperature)
            )
            whole, draw = _job(model, base / f"samples-{time.monotonic_ns()}", images)
            figures["job"].append(whole)
            figures["job_draw"].append(draw)
    results = {name: median(values) for name, values in figures.items()}
    report: dict[str, Any] = {
        "images": images,
        "repeats": repeats,
        "chunk_size": defaults.chunk_size,
        "machine": machine(),
        "results": results,
        "ratio": results["job"] / results["in_process"],
        "ratio_draw": results["job_draw"] / results["in_process"],
    }
    report["markdown"] = _markdown(report)
    return report


def _markdown(report: dict[str, Any]) -> str:
    results, images = report["results"], report["images"]
    rows = [
        ["in-process inverse pass (all cores, no PNG)", images, results["in_process"], 1.0],
        ["flowray sample, end to end", images, results["job"], report["ratio"]],
        ["flowray sample, draw phase", images, results["job_draw"], report["ratio_draw"]],
    ]
    table = markdown_table(["measurement", "images", "images/s (median)", "vs in-process"], rows)
    load = report["machine"]["load_average"]
    return (
        f"{table}\n\nmedian of {report['repeats']} runs on {report['machine']['cores']} cores "
        f"(load average at start {load}); chunks of {report['chunk_size']} images."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.sampling",
        description="Sampling images/s: flowray sample (Ray tasks) vs the in-process inverse pass.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=10_000, help="images per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians reported")
    parser.add_argument("--workdir", default=None, help="folder for outputs (default: temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.images, args.repeats, args.workdir)
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
