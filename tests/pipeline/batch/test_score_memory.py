"""The scoring driver's own state stays flat as the input grows: the collector holds the rows of
the shards in flight only, and the statistics are a fixed histogram and a bounded heap. Measured
with tracemalloc over the driver's code path (collector + statistics), without Ray."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.batch.scoring.output import ShardCollector, ShardTarget
from pipeline.batch.scoring.report import ScoreStats
from pipeline.storage import StorageConfig

ROWS_PER_SHARD = 500


def shard_rows(shard: int, rng: np.random.Generator) -> pd.DataFrame:
    """One shard's score rows as the actors hand them on, end marker on the last row."""
    bits = rng.uniform(1.0, 6.0, ROWS_PER_SHARD)
    marker = np.full(ROWS_PER_SHARD, -1)
    marker[-1] = ROWS_PER_SHARD
    return pd.DataFrame(
        {
            "key": [f"{shard:06d}-{i:06d}" for i in range(ROWS_PER_SHARD)],
            "shard": f"s3://b/photos/{shard:06d}.tar",
            "label": -1,
            "log_likelihood": -bits,
            "bits_per_dim": bits,
            "png_bits_per_dim": 1.0,
            "ood_score": bits - 1.0,
            "orig_width": 64,
            "orig_height": 48,
            "shard_rows": marker,
            "png": [b"\x89PNG" * 40 if i % 100 == 0 else b"" for i in range(ROWS_PER_SHARD)],
        }
    )


def test_driver_state_does_not_grow_with_the_images_scored(tmp_path: Path) -> None:
    shards = 50
    targets = {
        f"s3://b/photos/{s:06d}.tar": ShardTarget(f"{s:06d}.parquet", f"{s:06d}.tar")
        for s in range(shards)
    }
    stats = ScoreStats(keep=32)
    collector = ShardCollector(str(tmp_path), targets, StorageConfig(), on_rows=stats.add)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        held = []
        for shard in range(shards):
            rows = shard_rows(shard, rng)
            # Two shards in flight at a time, their rows interleaved in batches.
            collector.add(rows.iloc[:250])
            if shard:
                collector.add(previous.iloc[250:])  # noqa: F821 (set on the previous turn)
            previous = rows
            if shard in (10, shards - 1):
                held.append(tracemalloc.get_traced_memory()[0])
        collector.add(previous.iloc[250:])
    finally:
        tracemalloc.stop()
    assert len(collector.written) == shards and stats.count == shards * ROWS_PER_SHARD
    assert len(stats.least_likely()) == 32
    # 39 more shards (19,500 more images) later: what is held grew by the per-shard names
    # only (a few hundred bytes each), not by anything per image (~50 bytes x 19,500 = 1 MB).
    grown = held[1] - held[0]
    assert grown < 100 * 1024, f"driver state grew by {grown:,} bytes over 19,500 images"
