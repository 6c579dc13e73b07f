"""Scoring and sampling benchmark: Ray Data scoring against the raw in-process forward pass.

    python -m pipeline.bench.scoring                       # 1000 images, x10 for memory, 3 repeats
    python -m pipeline.bench.scoring --images 500 --repeats 2 --model <model dir>

Figures (medians over repeats), as a Markdown table and as `run(...)`'s dict (for `flowray bench`):
- raw forward: `predict_frame` (keyed dequantization, the scorer's math) on images already decoded
  in memory, in this process, with torch using every core.
- in-process, the same work: the raw forward plus the OOD score's complexity term (each image's
  maximum-compression PNG, `scoring.actors.max_png_bytes`, coded on one thread as in an actor),
  which a Scorer actor also computes.
  The baseline the Ray Data figures are divided by (issue 14: at least 0.85 at 100,000 images).
- Ray Data scoring, input on local disk and on S3 (moto on loopback): `pipeline.batch.scoring.job.score`
  end to end (read, PNG decode, forward, PNG complexity, Parquet per shard). Its images/s counts
  from the start of execution, actor start-up included, so small inputs understate it.
- the first job on the fresh Ray (N local images) runs before the timed ones, apart: it also
  starts Ray's worker processes, which later jobs of the same driver reuse.
- start-up: the intercept of the line through the two local runs' wall times (N and growth x N
  images): what a run costs before and besides its per-image work (planning, actor start, model
  load, the summary).
- peak memory of the whole job (driver + every Ray process it started: sum of PSS over the process
  tree) while scoring N and growth x N images: flat means inputs stream.
- sampling: `pipeline.batch.sampling.generate`, images/s end to end (PNG shards written).

The model is the local directory given, or the default FlowConfig at its data-dependent
initialisation (throughput does not depend on training). Data: Fashion-MNIST (FASHION_MNIST_DIR).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.batch.scoring.actors import local_cpus
from pipeline.bench.common import (
    BENCH_BUCKET,
    RssSampler,
    fake_s3_credentials,
    machine,
    markdown_table,
    median,
    start_s3,
)
from pipeline.storage import StorageConfig

__all__ = ["main", "run"]


def _model(model_dir: str | None, base: Path) -> str:
    if model_dir:
        return model_dir
    from flowmodel import FlowConfig, build_flow
    from pipeline.bench.common import fashion_mnist
    from pipeline.model.artifact import save_flow

    _, images = fashion_mnist("test", 256)
    flow = build_flow(FlowConfig())
    flow.initialize(images, generator=torch.Generator().manual_seed(0))
    return str(save_flow(flow, base / "model"))


def _prepare(count: int, out: str, storage: Any = None) -> str:
    """`count` Fashion-MNIST images in 500-image shards: the test split's first ones, or past its
    10,000 the test split repeated with unique keys (the training split has only 60,000)."""
    from pipeline.data.shards import prepare
    from pipeline.data.sources import open_source

    source = open_source("idx:")
    if count > source.splits()["test"]:
        if storage is not None:
            raise ValueError(f"S3 inputs: at most the test split's 10,000 images, asked {count}")
        from pipeline.bench.common import fashion_mnist
        from pipeline.bench.scaling import replicated_split

        _, base = fashion_mnist("test")
        return replicated_split(Path(out), base.numpy(), count, 500)
    prepare(source, out, storage, splits=["test"], limit=count, shard_samples=500)
    return f"{out}/test"


def _in_process(model_dir: str, split: str, batch_size: int) -> tuple[float, float]:
    """Images/s over decoded in-memory images, all cores, this process: of predict_frame alone
    (the raw forward), and of predict_frame plus each image's maximum-compression PNG (the
    scoring actors' work)."""
    from pipeline.batch.scoring.actors import max_png_bytes
    from pipeline.data.reader import iter_split
    from pipeline.model.artifact import load_flow
    from pipeline.model.likelihood import predict_frame

    flow = load_flow(model_dir)
    rows = list(iter_split(split))
    keys = [row["key"] for row in rows]
    images = np.stack([row["image"] for row in rows])  # (N, C, H, W)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        started = time.perf_counter()
        for i in range(0, len(keys), batch_size):
            predict_frame(flow, images[i : i + batch_size], keys[i : i + batch_size], 0, 1)
        forward = time.perf_counter() - started
        started = time.perf_counter()
        for image in images:
            max_png_bytes(image)
        png = time.perf_counter() - started
        return len(keys) / forward, len(keys) / (forward + png)
    finally:
        torch.set_num_threads(threads)


def run(
    images: int = 1000,
    repeats: int = 3,
    growth: int = 10,
    batch_size: int = 256,
    actors: int = 0,
    sample_images: int = 512,
    model_dir: str | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Measure the figures in the module docstring; medians over `repeats`.

    Returns:
        {"images", "repeats", "growth", "machine", "results": {"raw_forward", "in_process",
         "score_local", "score_s3", "score_local_<growth>x", "sampling"} (images/s),
         "ratio_local", "ratio_s3", "ratio_local_<growth>x" (over "in_process"), "s3_vs_local",
         "startup_seconds", "first_job_seconds",
         "memory_mb": {N: peak PSS, growth*N: peak PSS}, "markdown"}.
    """
    with ExitStack() as stack:
        base = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        fake_s3_credentials(stack)  # before Ray starts: its workers inherit them
        s3 = start_s3(stack)
        _local_ray(stack)
        bench = _Bench(_model(model_dir, base), base, s3, batch_size, actors)
        splits = {
            "local": _prepare(images, str(base / "data-n")),
            "large": _prepare(images * growth, str(base / f"data-{growth}n")),
            "s3": _prepare(images, f"s3://{BENCH_BUCKET}/data-n", s3),
        }
        # The first job on a fresh Ray also starts its worker processes: timed apart, so that
        # it does not count against whichever input is measured first.
        first = bench.score(splits["local"], "first")
        figures: dict[str, list[float]] = {}
        peaks: dict[str, list[float]] = {}
        startups: list[float] = []
        for repeat in range(repeats):
            raw, same_work = _in_process(bench.model, splits["local"], batch_size)
            figures.setdefault("raw_forward", []).append(raw)
            figures.setdefault("in_process", []).append(same_work)
            small = bench.score(splits["local"], "local")
            figures.setdefault("score_local", []).append(small.images_per_second)
            peaks.setdefault("n", []).append(small.peak_pss_mb)
            figures.setdefault("score_s3", []).append(
                bench.score(splits["s3"], "s3").images_per_second
            )
            large = bench.score(splits["large"], "large")
            figures.setdefault(f"score_local_{growth}x", []).append(large.images_per_second)
            peaks.setdefault(f"{growth}n", []).append(large.peak_pss_mb)
            startups.append(_intercept(images, small.seconds, images * growth, large.seconds))
            figures.setdefault("sampling", []).append(bench.sample(sample_images, repeat))
    results = {name: median(values) for name, values in figures.items()}
    report: dict[str, Any] = {
        "images": images,
        "repeats": repeats,
        "growth": growth,
        "machine": machine(),
        "results": results,
        "ratio_local": results["score_local"] / results["in_process"],
        "ratio_s3": results["score_s3"] / results["in_process"],
        f"ratio_local_{growth}x": results[f"score_local_{growth}x"] / results["in_process"],
        "s3_vs_local": results["score_s3"] / results["score_local"],
        "startup_seconds": median(startups),
        "first_job_seconds": first.seconds,
        "memory_mb": {name: median(values) for name, values in peaks.items()},
    }
    report["markdown"] = _markdown(report, sample_images)
    return report


def _local_ray(stack: ExitStack) -> None:
    """A local Ray, started as `flowray score` starts it (`local_cpus`), until `stack` closes;
    a Ray already running is used as it is."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=local_cpus(),  # as `flowray score` starts it
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        stack.callback(ray.shutdown)
    DataContext.get_current().enable_progress_bars = False


@dataclass(frozen=True)
class _Scored:
    images_per_second: float  # the job's own figure (ScoreResult), from the start of execution
    seconds: float  # wall time of the whole score() call
    peak_pss_mb: float


def _intercept(small: int, small_seconds: float, large: int, large_seconds: float) -> float:
    """Seconds at zero images of the line through two (images, seconds) runs: the fixed cost."""
    per_image = (large_seconds - small_seconds) / (large - small)
    return small_seconds - small * per_image


@dataclass(frozen=True)
class _Bench:
    """The model and settings every timed scoring and sampling run shares."""

    model: str
    base: Path
    s3: StorageConfig
    batch_size: int
    actors: int

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.base / 'mlflow.db'}"

    def score(self, split: str, tag: str) -> _Scored:
        """`flowray score` on `split` into a fresh prefix: images/s, wall time, peak PSS."""
        from pipeline.batch.scoring.job import ScoreConfig, score

        config = ScoreConfig(
            model=self.model,
            input=split,
            output=str(self.base / "scores" / f"{tag}-{time.monotonic_ns()}"),
            storage=self.s3,
            batch_size=self.batch_size,
            actors=self.actors,
            tracking_uri=self.tracking_uri,
            log_to_mlflow=False,
        )
        with RssSampler(interval=0.25) as memory:
            started = time.perf_counter()
            result = score(config)
            seconds = time.perf_counter() - started
        return _Scored(result.images_per_second, seconds, memory.peak_pss_mb)

    def sample(self, count: int, repeat: int) -> float:
        """Images/s of `flowray sample` writing `count` images as PNG shards."""
        from pipeline.batch.sampling import SampleConfig, generate

        started = time.perf_counter()
        generate(
            SampleConfig(
                model=self.model,
                output=str(self.base / "samples" / f"run-{repeat}-{time.monotonic_ns()}"),
                n=count,
                tracking_uri=self.tracking_uri,
                log_to_mlflow=False,
            )
        )
        return count / (time.perf_counter() - started)


def _markdown(report: dict[str, Any], sample_images: int) -> str:
    results, memory, growth = report["results"], report["memory_mb"], report["growth"]
    images = report["images"]
    baseline = results["in_process"]
    rows = [
        [
            "raw forward (in-process, all cores)",
            images,
            results["raw_forward"],
            results["raw_forward"] / baseline,
            "-",
        ],
        ["in-process, forward + PNG complexity (all cores)", images, baseline, 1.0, "-"],
        [
            "Ray Data score, local disk",
            images,
            results["score_local"],
            report["ratio_local"],
            memory["n"],
        ],
        ["Ray Data score, S3 (moto)", images, results["score_s3"], report["ratio_s3"], "-"],
        [
            f"Ray Data score, local disk, {growth}x input",
            images * growth,
            results[f"score_local_{growth}x"],
            report[f"ratio_local_{growth}x"],
            memory[f"{growth}n"],
        ],
        ["sampling (Ray tasks, PNG shards)", sample_images, results["sampling"], "-", "-"],
    ]
    table = markdown_table(
        ["measurement", "images", "images/s (median)", "vs in-process", "peak PSS MB"], rows
    )
    load = report["machine"]["load_average"]
    return (
        f"{table}\n\nmedian of {report['repeats']} runs on {report['machine']['cores']} cores "
        f"(load average at start {load}); Ray Data figures include actor start-up. "
        f"Start-up (intercept of the two local runs' wall times): "
        f"{report['startup_seconds']:.1f} s; the first job on the fresh Ray, untimed above, took "
        f"{report['first_job_seconds']:.1f} s for {images:,} images. "
        f"S3 / local disk: {report['s3_vs_local']:.2f}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.scoring",
        description="Scoring images/s (Ray Data vs raw forward, local vs S3), memory, sampling.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=1000, help="images scored per run (N)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians reported")
    parser.add_argument("--growth", type=int, default=10, help="memory check at growth x N")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--actors", type=int, default=0, help="scoring actors; 0 = auto")
    parser.add_argument("--sample-images", type=int, default=512, help="images per sampling run")
    parser.add_argument("--model", default=None, help="local model dir (default: untrained flow)")
    parser.add_argument("--workdir", default=None, help="folder for data/outputs (default: temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(
        args.images,
        args.repeats,
        args.growth,
        args.batch_size,
        args.actors,
        args.sample_images,
        args.model,
        args.workdir,
    )
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
