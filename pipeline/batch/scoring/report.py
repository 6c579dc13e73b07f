"""What a scoring run reports: streaming statistics of the scored rows, the summary files beside
the outputs, and the MLflow summary run.

    <prefix>/_summary/<UTC time>/summary.json                 metrics, least likely keys, skips,
                                                              shards left out (shard + reason)
    <prefix>/_summary/<UTC time>/bits_per_dim_histogram.png
    <prefix>/_summary/<UTC time>/least_likely.png             the least likely images, captioned
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import tempfile
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from pipeline.batch.scoring.config import ScoreConfig, ScoreResult
from pipeline.data.reader import SkipTally
from pipeline.storage import join_url, redact_url, write_bytes_atomic

__all__ = ["SUMMARY_DIR", "ScoreStats", "report"]

SUMMARY_DIR = "_summary"
LEFT_OUT_TAG = "flowray.left_out"  # MLflow tag of a summary run: "<shard>: <reason>" per line
_MAX_TAG = 5000  # MLflow's limit on a tag value (the full list is in summary.json)
# Histogram for the summary: fine bins give median and p99 to 1e-3 bits/dim in bounded memory.
_FINE_BIN, _FINE_MAX = 1e-3, 64.0


class ScoreStats:
    """Count, mean, fine histogram (for median / p99) and the least likely images, streaming."""

    def __init__(self, keep: int) -> None:
        self.count, self.total = 0, 0.0
        self.fine = np.zeros(int(_FINE_MAX / _FINE_BIN) + 1, dtype=np.int64)
        self.low, self.high = math.inf, -math.inf
        self.keep = keep
        self._heap: list[tuple[float, str, bytes]] = []  # min-heap on bits/dim

    def add(self, rows: pd.DataFrame) -> None:
        """Take score rows: bits_per_dim, key, and png (b"" for images not kept by the actor)."""
        bits = rows["bits_per_dim"].to_numpy()
        if not len(bits):
            return
        self.count += len(bits)
        self.total += float(bits.sum())
        self.low, self.high = min(self.low, float(bits.min())), max(self.high, float(bits.max()))
        bins = np.clip((bits / _FINE_BIN).astype(np.int64), 0, len(self.fine) - 1)
        np.add.at(self.fine, bins, 1)
        for value, key, png in zip(bits, rows["key"].to_numpy(), rows["png"].to_numpy()):
            if not png:
                continue
            item = (float(value), str(key), bytes(png))
            if len(self._heap) < self.keep:
                heapq.heappush(self._heap, item)
            elif item[0] > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    def least_likely(self) -> list[tuple[float, str, bytes]]:
        """(bits/dim, key, PNG) of the least likely images kept, least likely first."""
        return sorted(self._heap, reverse=True)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        if not self.count:
            return math.nan
        rank = int(np.searchsorted(np.cumsum(self.fine), q * self.count, side="left"))
        return (rank + 0.5) * _FINE_BIN  # centre of the bin; exact to _FINE_BIN / 2

    def histogram(self, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """Counts over `bins` equal bins from the lowest to the highest value seen."""
        low = math.floor(self.low / _FINE_BIN)
        high = min(math.ceil(self.high / _FINE_BIN) + 1, len(self.fine))
        chunks = np.array_split(self.fine[low:high], bins)
        counts = np.array([c.sum() for c in chunks])
        starts = np.cumsum([0] + [len(c) for c in chunks])
        return counts, (low + starts) * _FINE_BIN


def report(
    config: ScoreConfig,
    result: ScoreResult,
    stats: ScoreStats,
    tally: SkipTally | None,
    tracking_uri: str,
    shape: tuple[int, int, int],
) -> ScoreResult:
    """Write the summary files under _summary/<time>/ and log the MLflow summary run; returns
    `result` with where they went."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    summary_url = join_url(result.output, SUMMARY_DIR, stamp)
    metrics = _metrics(result)
    files = _pictures(result, stats, shape)
    summary = {
        "model": redact_url(config.model),
        "model_name": result.model_name,
        "model_version": result.model_version,
        "input": redact_url(config.input),
        "output": redact_url(result.output),
        "finished": stamp,
        "status": result.status,
        "metrics": metrics,
        "least_likely": [
            {"key": key, "bits_per_dim": bits} for bits, key, _ in stats.least_likely()
        ],
        "left_out": [{"shard": s, "reason": r} for s, r in result.shards_left_out],
        "skipped": [dataclasses.asdict(s) for s in tally.records()[:100]] if tally else [],
    }
    files["summary.json"] = json.dumps(summary, indent=1, default=str).encode()
    for name, data in files.items():
        write_bytes_atomic(join_url(summary_url, name), data, config.storage)
    run_id = None
    if config.log_to_mlflow:
        run_id = _log_run(config, result, metrics, files, tracking_uri, stamp)
    return dataclasses.replace(result, summary_url=summary_url, mlflow_run_id=run_id)


def _metrics(result: ScoreResult) -> dict[str, float]:
    return {
        "images_scored": result.images_scored,
        "images_skipped": result.images_skipped,
        "shards_written": len(result.shards_written),
        "shards_left_out": len(result.shards_left_out),
        "images_left_out": result.images_left_out,
        "shards_already_done": result.shards_already_done,
        "shards_new": result.shards_new,
        "shards_changed": result.shards_changed,
        "listing_seconds": result.listing_seconds,
        "mean_bits_per_dim": result.mean_bits_per_dim,
        "median_bits_per_dim": result.median_bits_per_dim,
        "p99_bits_per_dim": result.p99_bits_per_dim,
        "images_per_second": result.images_per_second,
        "seconds": result.seconds,
    }


def _pictures(
    result: ScoreResult, stats: ScoreStats, shape: tuple[int, int, int]
) -> dict[str, bytes]:
    """The bits/dim histogram and the grid of the least likely images, as PNG files by name."""
    from pipeline.data.reader import decode_image
    from pipeline.plots import bits_per_dim_histogram, captioned_images_png

    label = f"{result.model_name} v{result.model_version}"
    files: dict[str, bytes] = {}
    if stats.count:
        counts, edges = stats.histogram()
        files["bits_per_dim_histogram.png"] = bits_per_dim_histogram(
            counts,
            edges,
            f"bits/dim of {stats.count:,} images under {label}",
            markers={"mean": stats.mean, "p99": stats.quantile(0.99)},
        )
    worst = stats.least_likely()
    if worst:
        images = np.stack([decode_image(png, shape) for _, _, png in worst])
        captions = [f"{key}\n{bits:.3f} bits/dim" for bits, key, _ in worst]
        files["least_likely.png"] = captioned_images_png(
            images, captions, f"{len(worst)} least likely images under {label}"
        )
    return files


def _log_run(
    config: ScoreConfig,
    result: ScoreResult,
    metrics: dict[str, float],
    files: dict[str, bytes],
    tracking_uri: str,
    stamp: str,
) -> str:
    """The MLflow summary run: the config as params, the metrics, the summary files; its id."""
    import mlflow

    from pipeline.tracking.connection import ensure_experiment, log_config_params

    experiment_id = ensure_experiment(tracking_uri, config.experiment)
    tags = {
        "flowray.job": "score",
        "flowray.status": result.status,
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
    if result.shards_left_out:
        listed = "\n".join(f"{shard}: {reason}" for shard, reason in result.shards_left_out)
        tags[LEFT_OUT_TAG] = listed if len(listed) <= _MAX_TAG else listed[: _MAX_TAG - 3] + "..."
    run_name = f"score {result.model_name} v{result.model_version} {stamp}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        log_config_params(run.info.run_id, _redacted(config))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not _nan(v)})
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as file:
                    file.write(data)
            mlflow.log_artifacts(tmp, artifact_path="summary")
        return run.info.run_id


def _redacted(config: ScoreConfig) -> ScoreConfig:
    """The config as it may be saved: no `user:password@` in any URL."""
    return dataclasses.replace(
        config,
        model=redact_url(config.model),
        input=redact_url(config.input),
        output=redact_url(config.output),
        tracking_uri=redact_url(config.tracking_uri) if config.tracking_uri else None,
        storage=dataclasses.replace(
            config.storage,
            endpoint_url=redact_url(config.storage.endpoint_url)
            if config.storage.endpoint_url
            else None,
        ),
    )


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
