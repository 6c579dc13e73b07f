"""Scoring at growing sizes: wall time and peak memory of the whole job (driver + Ray processes).

`pipeline.batch.scoring.job.score` with the preset's model at its initialisation, on the
Fashion-MNIST test split repeated with unique keys past its 10,000 images (prepared once per size
and found again by the next run). With `fresh_ray`, each size runs on its own local Ray, so that
its memory is the job's alone (`RssSampler`: peak summed PSS and RSS). Linearity: seconds per
image against the smallest size's; memory flatness: peak PSS against the smallest size's.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table

MEMORY_TOLERANCE = 0.2  # peak memory may grow at most 20% from the smallest size


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the training preset whose model scores
    sizes: tuple[int, ...] = (10_000, 30_000, 100_000)  # a run each (1,000,000: ~15 min, 2 cores)
    shard_samples: int = 10_000  # images per shard
    batch_size: int = 256  # ScoreConfig.batch_size
    fresh_ray: bool = True  # a local Ray per size (false: one for all sizes)


SMOKE = {"sizes": [256, 512], "shard_samples": 128, "batch_size": 128, "fresh_ray": False}


def _score_size(model: str, split: str, size: int, settings: Settings, run: Run) -> dict[str, Any]:
    output = run.workdir / f"scores-{time.strftime('%Y%m%d-%H%M%S')}-{size}"
    run.log(f"scaling: scoring {size:,} images")
    batch = settings.batch_size
    seconds, result, memory = harness.score_job(model, split, output, run.workdir, batch_size=batch)
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
    model = harness.saved_preset_model(run.workdir, settings.preset)
    rows: list[dict[str, Any]] = []
    with harness.local_ray():  # prepare's Ray tasks, and every size unless fresh_ray
        splits = {}
        for size in sizes:
            run.log(f"scaling: preparing {size:,} images")
            splits[size] = harness.prepared_fashion_mnist(
                str(run.workdir / f"data-{size}"),
                size,
                shard_samples=settings.shard_samples,
                workers=os.cpu_count() or 1,
            )
        if not settings.fresh_ray:
            rows = [_score_size(model, splits[s], s, settings, run) for s in sizes]
    for size in sizes if settings.fresh_ray else ():
        with harness.local_ray():  # so that the memory measured is this size's job alone
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
    """PSS by process role at each size's peak: the `top` roles at the largest size, the rest
    summed as "other"."""
    roles = [row["peak_pss_by_role_mb"] for row in rows]
    names = sorted(roles[-1], key=lambda name: -roles[-1][name])[:top]
    body = [[name, *(by_role.get(name, 0.0) for by_role in roles)] for name in names]
    body.append(
        ["other", *(sum(v for k, v in by_role.items() if k not in names) for by_role in roles)]
    )
    return Table(["role", *(f"{row['images']:,} images" for row in rows)], body)
