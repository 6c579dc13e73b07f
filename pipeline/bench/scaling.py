"""Scoring at growing sizes: wall time and peak memory of the whole job (driver + Ray processes).

    report = run([10_000, 100_000, 1_000_000], workdir="bench-work/scaling")

Data: the Fashion-MNIST test split (10,000 images) replicated to each size, written as a .npy and
prepared into shards by `pipeline.data.shards.prepare` (Ray tasks), so every image gets its own key
("train-00123456"; NpySource's one split is "train"). A prepared size is kept in `workdir` and found
again by the next run (prepare skips finished work), so only the first run at 1M pays for it.

Scoring: `pipeline.batch.scoring.job.score` (the `flowray score` job: Ray Data read -> actor pool ->
Parquet per shard) with the preset's architecture at its ActNorm-initialised weights (throughput
does not depend on training), into a fresh output prefix per run. With `fresh_ray`, each size runs
on its own local Ray, started as `flowray score` starts it (one logical CPU per core plus one), so
that its memory is the job's alone. Memory: `pipeline.bench.common.RssSampler` over this process
and all its descendants (GCS, raylet, workers, actors), peak summed PSS (shared object-store pages
counted once) and RSS.

Linearity: seconds per image at each size over that of the smallest (1.0 = linear); memory
flatness: peak PSS over the smallest size's (target: within 1.2).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmodel import FlowConfig, build_flow
from pipeline.batch.scoring.actors import local_cpus
from pipeline.bench.common import RssSampler, fashion_mnist, machine, markdown_table

__all__ = ["DEFAULT_SIZES", "MEMORY_TOLERANCE", "markdown", "replicated_split", "run"]

DEFAULT_SIZES = (10_000, 30_000, 100_000)  # 1M: pass sizes (about 15 min to score on 2 cores)
MEMORY_TOLERANCE = 0.2  # peak memory may grow at most 20% from the smallest size


def replicated_split(workdir: Path, images: np.ndarray, size: int, shard_samples: int) -> str:
    """The split of `size` images (the base images repeated), prepared once under workdir."""
    from pipeline.data.shards import ManifestError, load_manifest, prepare
    from pipeline.data.sources import NpySource

    out = workdir / f"data-{size}"
    split = out / "train"
    try:
        if load_manifest(str(split)).count == size:
            return str(split)
    except ManifestError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    npy = out / "images.npy"
    np.save(npy, np.resize(images, (size, *images.shape[1:])))  # repeats the base images
    prepare(
        NpySource(str(npy)),
        str(out),
        shard_samples=shard_samples,
        workers=os.cpu_count() or 1,
    )
    npy.unlink()  # the shards hold the images now
    return str(split)


def _start_ray() -> None:
    import logging

    import ray

    ray.init(
        address="local",  # never join another engineer's cluster on this machine
        num_cpus=local_cpus(),  # as `flowray score` starts it
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    workdir: str | Path,
    model_config: FlowConfig | None = None,
    base_images: int | None = None,
    shard_samples: int = 10_000,
    batch_size: int = 256,
    fresh_ray: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score each size once; see the module docstring.

    Args:
        sizes: images to score, ascending.
        workdir: prepared data (kept between runs), the model and the scores (removed after).
        model_config: the architecture (default: FlowConfig()).
        base_images: replicate the first N test images (None: all 10,000; smoke runs).
        shard_samples: images per shard.
        batch_size: ScoreConfig.batch_size.
        fresh_ray: start a local Ray per size (False: use the running one; smoke runs).
    """
    import ray

    from pipeline.model.artifact import save_flow

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _, base = fashion_mnist("test", base_images)
    flow = build_flow(model_config or FlowConfig())
    flow.initialize(base[:512], generator=torch.Generator().manual_seed(0))
    model_dir = save_flow(flow, workdir / "model")
    started_ray = not ray.is_initialized()
    if started_ray:
        _start_ray()
    rows = []
    try:
        splits = {}
        for size in sorted(sizes):
            log(f"scaling: preparing {size:,} images")
            splits[size] = replicated_split(workdir, base.numpy(), size, shard_samples)
        for size in sorted(sizes):
            if fresh_ray:  # so that the memory measured is this size's job alone
                ray.shutdown()
                _start_ray()
                started_ray = True
            rows.append(_score_size(model_dir, splits[size], size, workdir, batch_size, log))
    finally:
        if started_ray:
            ray.shutdown()
    growth = _relative_to_smallest(rows)
    report = {
        "machine": machine(),
        "settings": {
            "sizes": sorted(sizes),
            "base_images": len(base),
            "shard_samples": shard_samples,
            "batch_size": batch_size,
            "fresh_ray": fresh_ray,
        },
        "rows": rows,
        "memory_growth": growth,
        "targets": {
            "memory_within": MEMORY_TOLERANCE,
            "memory_met": bool(growth <= 1 + MEMORY_TOLERANCE),
            "largest_seconds_per_image_vs_smallest": rows[-1]["seconds_per_image_vs_smallest"],
        },
    }
    report["markdown"] = markdown(report)
    return report


def _score_size(
    model_dir: Path,
    split: str,
    size: int,
    workdir: Path,
    batch_size: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One `flowray score` run over `split`: wall time, images/s and peak memory of the job."""
    from pipeline.batch.scoring.job import ScoreConfig, score

    output = workdir / f"scores-{time.strftime('%Y%m%d-%H%M%S')}-{size}"
    config = ScoreConfig(
        model=str(model_dir),
        input=split,
        output=str(output),
        batch_size=batch_size,
        log_to_mlflow=False,
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
    )
    log(f"scaling: scoring {size:,} images")
    with RssSampler() as memory:
        began = time.perf_counter()
        result = score(config)
        seconds = time.perf_counter() - began
    shutil.rmtree(output, ignore_errors=True)  # this run's own scores, not needed
    log(f"scaling: {size:,} images in {seconds:.1f} s, peak PSS {memory.peak_pss_mb:,.0f} MB")
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


def _relative_to_smallest(rows: list[dict[str, Any]]) -> float:
    """Adds each row's seconds per image and peak PSS over the first (smallest) row's; returns
    the largest PSS ratio."""
    first = rows[0]
    for row in rows:
        row["seconds_per_image_vs_smallest"] = (row["seconds"] / row["images"]) / (
            first["seconds"] / first["images"]
        )
        row["peak_pss_vs_smallest"] = row["peak_pss_mb"] / first["peak_pss_mb"]
    return max(row["peak_pss_vs_smallest"] for row in rows)


def markdown(report: dict[str, Any]) -> str:
    rows = [
        [
            row["images"],
            row["seconds"],
            row["images_per_second"],
            row["seconds_per_image_vs_smallest"],
            row["peak_pss_mb"],
            row["peak_rss_mb"],
            row["peak_pss_vs_smallest"],
        ]
        for row in report["rows"]
    ]
    table = markdown_table(
        [
            "images",
            "wall s",
            "images/s",
            "s/image vs smallest",
            "peak PSS MB",
            "peak RSS MB (sum)",
            "PSS vs smallest",
        ],
        rows,
    )
    settings, targets = report["settings"], report["targets"]
    roles = _role_table(report["rows"])
    verdict = "met" if targets["memory_met"] else "missed"
    machine_info = report["machine"]
    return "\n".join(
        [
            table,
            "",
            f"`pipeline.batch.scoring.job.score` on the Fashion-MNIST test split replicated "
            f"({settings['base_images']:,} distinct images, unique keys), "
            f"{settings['shard_samples']:,} images per shard, batch {settings['batch_size']}, "
            f"{'a fresh local Ray per size' if settings['fresh_ray'] else 'one shared Ray'}; "
            f"memory of the driver and all Ray processes, sampled every 0.5 s.",
            f"Time linear: s/image at the largest size is {targets['largest_seconds_per_image_vs_smallest']:.2f}x "
            f"the smallest's (1.00 = linear). Memory flat within "
            f"{100 * targets['memory_within']:.0f}%: {verdict} (peak PSS up to "
            f"{report['memory_growth']:.2f}x the smallest size's).",
            f"Machine: {machine_info['cpu']}, {machine_info['cores']} cores, Ray "
            f"{machine_info['ray']}, load average at start {machine_info['load_average'][0]}.",
            "",
            "Where the peak PSS sat (MB, by process role, at each size's peak sample):",
            "",
            roles,
        ]
    )


def _role_table(rows: list[dict[str, Any]], top: int = 8) -> str:
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
    return markdown_table(["role", *(f"{row['images']:,} images" for row in rows)], body)
