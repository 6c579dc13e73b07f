"""Scoring: Ray Data scoring (`flowray score`) against the same work in-process.

Figures (medians over repeats):
- raw forward: `predict_frame` (keyed dequantization, the scorer's math) on images already decoded
  in memory, in this process, with torch using every core.
- in-process, the same work: the raw forward plus the OOD score's complexity term (each image's
  maximum-compression PNG, `max_png_bytes`, coded on one thread as in an actor). The baseline the
  Ray Data figures are divided by.
- Ray Data scoring, input on local disk and on S3 (moto on loopback):
  `pipeline.batch.scoring.job.score` end to end (read, PNG decode, forward, PNG complexity,
  Parquet per shard). Its images/s counts from the start of execution, actor start-up included,
  so small inputs understate it.
- the first job on the fresh Ray runs before the timed ones, apart: it also starts Ray's worker
  processes, which later jobs of the same driver reuse.
- start-up: the intercept of the line through the two local runs' wall times (N and growth x N
  images): what a run costs before and besides its per-image work.
- peak memory of the whole job (driver + every Ray process: summed PSS over the process tree)
  while scoring N and growth x N images: flat means inputs stream.

The model is the preset's at its data-dependent initialisation (throughput does not depend on
training), or the local model directory given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.harness import (
    BENCH_BUCKET,
    Result,
    RssSampler,
    Run,
    Table,
    local_ray,
    loopback_s3,
    median,
    prepared_fashion_mnist,
    saved_preset_model,
    timed,
    torch_threads,
)
from pipeline.config import load_config
from pipeline.storage import StorageConfig
from pipeline.train.config import TrainConfig

__all__ = ["SMOKE", "Settings", "measure"]


@dataclass(frozen=True)
class Settings:
    """Attributes:
    preset: the training preset whose model is scored.
    model: a local model directory to score instead (None: the preset's, untrained).
    images: images scored per run (N).
    repeats: runs; medians reported.
    growth: the memory check scores growth x N images.
    batch_size: images per forward pass.
    actors: scoring actors (0: as many as the CPUs allow).
    """

    preset: str = "fashion-mnist"
    model: str | None = None
    images: int = 1000
    repeats: int = 3
    growth: int = 10
    batch_size: int = 256
    actors: int = 0


SMOKE = {"images": 128, "repeats": 1, "growth": 2}


def _in_process(model_dir: str, split: str, batch_size: int) -> tuple[float, float]:
    """Images/s over decoded in-memory images, all cores, this process: of predict_frame alone
    (the raw forward), and of predict_frame plus each image's maximum-compression PNG."""
    from pipeline.data.reader import iter_input
    from pipeline.model.artifact import load_flow
    from pipeline.model.likelihood import predict_frame
    from pipeline.model.scores import max_png_bytes

    flow = load_flow(model_dir)
    rows = list(iter_input(split, shape=flow.config.image_shape))
    keys = [row["key"] for row in rows]
    images = np.stack([row["image"] for row in rows])  # (N, C, H, W)
    with torch_threads(None):
        forward, _ = timed(
            lambda: [
                predict_frame(flow, images[i : i + batch_size], keys[i : i + batch_size], 0, 1)
                for i in range(0, len(keys), batch_size)
            ]
        )
        png, _ = timed(lambda: [max_png_bytes(image) for image in images])
    return len(keys) / forward, len(keys) / (forward + png)


def _intercept(small: int, small_seconds: float, large: int, large_seconds: float) -> float:
    """Seconds at zero images of the line through two (images, seconds) runs: the fixed cost."""
    per_image = (large_seconds - small_seconds) / (large - small)
    return small_seconds - small * per_image


def _score(
    settings: Settings, model: str, split: str, base: Path, s3: StorageConfig, tag: str
) -> dict[str, float]:
    """`flowray score` on `split` into a fresh prefix: images/s, wall time, peak PSS."""
    from pipeline.batch.scoring.job import ScoreConfig, score

    config = ScoreConfig(
        model=model,
        input=split,
        output=str(base / "scores" / f"{tag}-{time.monotonic_ns()}"),
        storage=s3,
        batch_size=settings.batch_size,
        actors=settings.actors,
        tracking_uri=f"sqlite:///{base / 'mlflow.db'}",
        log_to_mlflow=False,
    )
    with RssSampler(interval=0.25) as memory:
        seconds, result = timed(lambda: score(config))
    return {"rate": result.images_per_second, "seconds": seconds, "pss": memory.peak_pss_mb}


def measure(settings: Settings, run: Run) -> Result:
    """The figures in the module docstring; medians over `repeats`."""
    base, n, growth = run.workdir, settings.images, settings.growth
    base.mkdir(parents=True, exist_ok=True)
    model_config = load_config(TrainConfig, settings.preset).model
    model = settings.model or saved_preset_model(base, model_config)
    figures: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {"n": [], f"{growth}n": []}
    startups: list[float] = []
    # Stand-in credentials before Ray starts: its workers inherit them.
    with loopback_s3() as s3, local_ray():
        local = prepared_fashion_mnist(str(base / f"data-{n}"), n)
        large = prepared_fashion_mnist(str(base / f"data-{n * growth}"), n * growth)
        remote = prepared_fashion_mnist(f"s3://{BENCH_BUCKET}/data-{n}", n, storage=s3)
        # The first job on a fresh Ray also starts its worker processes: timed apart.
        first = _score(settings, model, local, base, s3, "first")
        for _ in range(settings.repeats):
            raw, same_work = _in_process(model, local, settings.batch_size)
            small = _score(settings, model, local, base, s3, "local")
            on_s3 = _score(settings, model, remote, base, s3, "s3")
            big = _score(settings, model, large, base, s3, "large")
            for name, value in (
                ("raw_forward", raw),
                ("in_process", same_work),
                ("score_local", small["rate"]),
                ("score_s3", on_s3["rate"]),
                (f"score_local_{growth}x", big["rate"]),
            ):
                figures.setdefault(name, []).append(value)
            peaks["n"].append(small["pss"])
            peaks[f"{growth}n"].append(big["pss"])
            startups.append(_intercept(n, small["seconds"], n * growth, big["seconds"]))
    results = {name: median(values) for name, values in figures.items()}
    baseline = results["in_process"]
    report: dict[str, Any] = {
        "images": n,
        "repeats": settings.repeats,
        "growth": growth,
        "results": results,
        "ratio_local": results["score_local"] / baseline,
        "ratio_s3": results["score_s3"] / baseline,
        f"ratio_local_{growth}x": results[f"score_local_{growth}x"] / baseline,
        "s3_vs_local": results["score_s3"] / results["score_local"],
        "startup_seconds": median(startups),
        "first_job_seconds": first["seconds"],
        "memory_mb": {name: median(values) for name, values in peaks.items()},
    }
    return Result(report, [_table(report)])


def _table(report: dict[str, Any]) -> Table:
    results, memory, growth, n = (report[k] for k in ("results", "memory_mb", "growth", "images"))
    baseline = results["in_process"]
    return Table(
        ["measurement", "images", "images/s (median)", "vs in-process", "peak PSS MB"],
        [
            [
                "raw forward (in-process, all cores)",
                n,
                results["raw_forward"],
                results["raw_forward"] / baseline,
                "-",
            ],
            ["in-process, forward + PNG complexity (all cores)", n, baseline, 1.0, "-"],
            [
                "Ray Data score, local disk",
                n,
                results["score_local"],
                report["ratio_local"],
                memory["n"],
            ],
            ["Ray Data score, S3 (moto)", n, results["score_s3"], report["ratio_s3"], "-"],
            [
                f"Ray Data score, local disk, {growth}x input",
                n * growth,
                results[f"score_local_{growth}x"],
                report[f"ratio_local_{growth}x"],
                memory[f"{growth}n"],
            ],
        ],
        [
            f"Median of {report['repeats']} runs; Ray Data figures include actor start-up. "
            f"Start-up (intercept of the two local runs' wall times): "
            f"{report['startup_seconds']:.1f} s; the first job on the fresh Ray, untimed above, "
            f"took {report['first_job_seconds']:.1f} s for {n:,} images. "
            f"S3 / local disk: {report['s3_vs_local']:.2f}."
        ],
    )
