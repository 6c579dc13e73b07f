"""Scoring at growing sizes: wall time and peak memory of the whole job (driver + Ray processes).

Data: the Fashion-MNIST test split, repeated with unique keys past its 10,000 images, prepared
once per size under the work folder and found again by the next run (`prepared_fashion_mnist`).
Scoring: `pipeline.batch.scoring.job.score` (the `flowray score` job: Ray Data read -> actor pool ->
Parquet per shard) with the preset's model at its ActNorm-initialised weights, into a fresh output
prefix per run. With `fresh_ray`, each size runs on its own local Ray, started as `flowray score`
starts it, so that its memory is the job's alone. Memory: `RssSampler` over this process and all
its descendants (GCS, raylet, workers, actors): peak summed PSS (shared object-store pages counted
once) and RSS.

Linearity: seconds per image at each size over that of the smallest (1.0 = linear); memory
flatness: peak PSS over the smallest size's (target: within 1.2).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from pipeline.bench.harness import (
    Result,
    RssSampler,
    Run,
    Table,
    local_ray,
    prepared_fashion_mnist,
    saved_preset_model,
    timed,
)

MEMORY_TOLERANCE = 0.2  # peak memory may grow at most 20% from the smallest size


@dataclass(frozen=True)
class Settings:
    """Attributes:
    preset: the training preset whose model scores.
    sizes: images to score, one run each (1,000,000 takes about 15 minutes on 2 cores).
    shard_samples: images per shard.
    batch_size: ScoreConfig.batch_size.
    fresh_ray: a local Ray per size (false: one for all sizes).
    """

    preset: str = "fashion-mnist"
    sizes: tuple[int, ...] = (10_000, 30_000, 100_000)
    shard_samples: int = 10_000
    batch_size: int = 256
    fresh_ray: bool = True


SMOKE = {"sizes": [256, 512], "shard_samples": 128, "batch_size": 128, "fresh_ray": False}


def _score_size(model: str, split: str, size: int, settings: Settings, run: Run) -> dict[str, Any]:
    """One `flowray score` run over `split`: wall time, images/s and peak memory of the job."""
    from pipeline.batch.scoring.job import ScoreConfig, score

    output = run.workdir / f"scores-{time.strftime('%Y%m%d-%H%M%S')}-{size}"
    config = ScoreConfig(
        model=model,
        input=split,
        output=str(output),
        batch_size=settings.batch_size,
        log_to_mlflow=False,
        tracking_uri=f"sqlite:///{run.workdir / 'mlflow.db'}",
    )
    run.log(f"scaling: scoring {size:,} images")
    with RssSampler() as memory:
        seconds, result = timed(lambda: score(config))
    shutil.rmtree(output, ignore_errors=True)  # this run's own scores, not needed
    run.log(f"scaling: {size:,} images in {seconds:.1f} s, peak PSS {memory.peak_pss_mb:,.0f} MB")
    return {
        "images": size,
        "scored": result.images_scored,
        "seconds": seconds,
        "images_per_second": result.images_scored / seconds,
        "peak_pss_mb": memory.peak_pss_mb,
        "peak_rss_mb": memory.peak_rss_mb,
        "processes": memory.processes,
        "peak_pss_by_role_mb": memory.peak_pss_by_role_mb,
    }


def measure(settings: Settings, run: Run) -> Result:
    sizes = sorted(settings.sizes)
    model = saved_preset_model(run.workdir, settings.preset)
    rows: list[dict[str, Any]] = []
    with local_ray():  # prepare's Ray tasks, and every size unless fresh_ray
        splits = {}
        for size in sizes:
            run.log(f"scaling: preparing {size:,} images")
            splits[size] = prepared_fashion_mnist(
                str(run.workdir / f"data-{size}"),
                size,
                shard_samples=settings.shard_samples,
                workers=os.cpu_count() or 1,
            )
        if not settings.fresh_ray:
            rows = [_score_size(model, splits[s], s, settings, run) for s in sizes]
    for size in sizes if settings.fresh_ray else ():
        with local_ray():  # so that the memory measured is this size's job alone
            rows.append(_score_size(model, splits[size], size, settings, run))
    first = rows[0]
    for row in rows:
        per_image = (row["seconds"] / row["images"]) / (first["seconds"] / first["images"])
        row["seconds_per_image_vs_smallest"] = per_image
        row["peak_pss_vs_smallest"] = row["peak_pss_mb"] / first["peak_pss_mb"]
    growth = max(row["peak_pss_vs_smallest"] for row in rows)
    linear, met = rows[-1]["seconds_per_image_vs_smallest"], growth <= 1 + MEMORY_TOLERANCE
    report = {
        "settings": {
            "sizes": sizes,
            "shard_samples": settings.shard_samples,
            "batch_size": settings.batch_size,
            "fresh_ray": settings.fresh_ray,
        },
        "rows": rows,
        "memory_growth": growth,
        "targets": {
            "memory_within": MEMORY_TOLERANCE,
            "memory_met": bool(met),
            "largest_seconds_per_image_vs_smallest": linear,
        },
    }
    columns = {  # header: key
        "images": "images",
        "wall s": "seconds",
        "images/s": "images_per_second",
        "s/image vs smallest": "seconds_per_image_vs_smallest",
        "peak PSS MB": "peak_pss_mb",
        "peak RSS MB (sum)": "peak_rss_mb",
        "PSS vs smallest": "peak_pss_vs_smallest",
    }
    ray = "a fresh local Ray per size" if settings.fresh_ray else "one shared Ray"
    table = Table(
        list(columns),
        [[row[key] for key in columns.values()] for row in rows],
        [
            "`pipeline.batch.scoring.job.score` on the Fashion-MNIST test split (repeated with "
            f"unique keys past 10,000 images), {settings.shard_samples:,} images per shard, batch "
            f"{settings.batch_size}, {ray}; memory of the driver and all Ray processes, sampled "
            "every 0.5 s.",
            f"Time linear: s/image at the largest size is {linear:.2f}x the smallest's (1.00 = "
            f"linear). Memory flat within {100 * MEMORY_TOLERANCE:.0f}%: "
            f"{'met' if met else 'missed'} (peak PSS up to {growth:.2f}x the smallest size's).",
            "Where the peak PSS sat (MB, by process role, at each size's peak sample):",
        ],
    )
    return Result(report, [table, role_table(rows)])


def role_table(rows: list[dict[str, Any]], top: int = 8) -> Table:
    """PSS by process role at each size's peak: the `top` roles by their share at the largest
    size, the rest summed as "other"."""
    largest = rows[-1].get("peak_pss_by_role_mb", {})
    names = sorted(largest, key=lambda name: -largest[name])[:top]
    body = []
    for name in [*names, "other"]:
        values = []
        for row in rows:
            by_role = row.get("peak_pss_by_role_mb", {})
            if name == "other":
                values.append(sum(v for k, v in by_role.items() if k not in names))
            else:
                values.append(by_role.get(name, 0.0))
        body.append([name, *values])
    return Table(["role", *(f"{row['images']:,} images" for row in rows)], body)
