"""Scoring and sampling benchmark: Ray Data scoring against the raw in-process forward pass.

    python -m pipeline.bench.scoring                       # 1000 images, x10 for memory, 3 repeats
    python -m pipeline.bench.scoring --images 500 --repeats 2 --model <model dir>

Figures (medians over repeats), as a Markdown table and as `run(...)`'s dict (for `flowray bench`):
- raw forward: `predict_frame` (keyed dequantization, the scorer's math) on images already decoded
  in memory, in this process, with torch using every core. The ceiling for scoring.
- Ray Data scoring, input on local disk and on S3 (moto on loopback): `pipeline.batch.scoring.score`
  end to end (read, PNG decode, forward, PNG complexity, Parquet per shard). Its images/s counts
  from the start of execution, actor start-up included, so small inputs understate it.
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

from pipeline.batch.score_pipeline import local_cpus
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
    from pipeline.data.shards import prepare
    from pipeline.data.sources import open_source

    source = open_source("idx:")
    split = "test" if count <= source.splits()["test"] else "train"
    prepare(source, out, storage, splits=[split], limit=count, shard_samples=500)
    return f"{out}/{split}"


def _raw_forward(model_dir: str, split: str, batch_size: int) -> float:
    """Images/s of predict_frame over decoded in-memory images, all cores, this process."""
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
        return len(keys) / (time.perf_counter() - started)
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
        {"images", "repeats", "growth", "machine", "results": {"raw_forward", "score_local",
         "score_s3", "sampling"} (images/s), "ratio_local", "ratio_s3",
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
        figures: dict[str, list[float]] = {}
        peaks: dict[str, list[float]] = {}
        for repeat in range(repeats):
            figures.setdefault("raw_forward", []).append(
                _raw_forward(bench.model, splits["local"], batch_size)
            )
            speed, peak = bench.score(splits["local"], "local")
            figures.setdefault("score_local", []).append(speed)
            peaks.setdefault("n", []).append(peak)
            figures.setdefault("score_s3", []).append(bench.score(splits["s3"], "s3")[0])
            speed, peak = bench.score(splits["large"], "large")
            figures.setdefault(f"score_local_{growth}x", []).append(speed)
            peaks.setdefault(f"{growth}n", []).append(peak)
            figures.setdefault("sampling", []).append(bench.sample(sample_images, repeat))
    results = {name: median(values) for name, values in figures.items()}
    report: dict[str, Any] = {
        "images": images,
        "repeats": repeats,
        "growth": growth,
        "machine": machine(),
        "results": results,
        "ratio_local": results["score_local"] / results["raw_forward"],
        "ratio_s3": results["score_s3"] / results["raw_forward"],
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

    def score(self, split: str, tag: str) -> tuple[float, float]:
        """`flowray score` on `split` into a fresh prefix: images/s and peak PSS (MB)."""
        from pipeline.batch.scoring import ScoreConfig, score

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
            result = score(config)
        return result.images_per_second, memory.peak_pss_mb

    def sample(self, count: int, repeat: int) -> float:
        """Images/s of `flowray sample` writing `count` images as PNG shards."""
        from pipeline.batch.sampling import SampleConfig, generate

        started = time.perf_counter()
        generate(
            SampleConfig(
                model=self.model,
                output=str(self.base / "samples" / f"run-{repeat}"),
                n=count,
                tracking_uri=self.tracking_uri,
                log_to_mlflow=False,
            )
        )
        return count / (time.perf_counter() - started)


def _markdown(report: dict[str, Any], sample_images: int) -> str:
    results, memory, growth = report["results"], report["memory_mb"], report["growth"]
    images = report["images"]
    rows = [
        ["raw forward (in-process, all cores)", images, results["raw_forward"], 1.0, "-"],
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
            results[f"score_local_{growth}x"] / results["raw_forward"],
            memory[f"{growth}n"],
        ],
        ["sampling (Ray tasks, PNG shards)", sample_images, results["sampling"], "-", "-"],
    ]
    table = markdown_table(
        ["measurement", "images", "images/s (median)", "vs raw forward", "peak PSS MB"], rows
    )
    load = report["machine"]["load_average"]
    return (
        f"{table}\n\nmedian of {report['repeats']} runs on {report['machine']['cores']} cores "
        f"(load average at start {load}); Ray Data figures include actor start-up."
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
