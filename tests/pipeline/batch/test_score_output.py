"""Scoring's output without Ray: the collector writes each shard's Parquet file once, when all its
rows are in (or the stream ends), keeps the first copy of a repeated key, and the settings file
refuses to mix scores made with other settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.batch.score_config import ScoreError
from pipeline.batch.score_output import (
    OUTPUT_COLUMNS,
    SETTINGS_FILE,
    ShardCollector,
    check_settings,
    parquet_name,
)
from pipeline.storage import StorageConfig

STORAGE = StorageConfig()


def rows(shard: str, keys: list[str], bits: float) -> pd.DataFrame:
    """Score rows as the pipeline streams them (OUTPUT_COLUMNS plus png)."""
    n = len(keys)
    return pd.DataFrame(
        {
            "key": keys,
            "shard": [shard] * n,
            "label": np.arange(n, dtype=np.int64),
            "log_likelihood": np.full(n, -bits * 784 * np.log(2)),
            "bits_per_dim": np.full(n, bits),
            "png_bits_per_dim": np.full(n, 1.0),
            "ood_score": np.full(n, bits - 1.0),
            "png": [b""] * n,
        }
    )


def test_a_shard_is_written_once_complete_with_repeated_keys_kept_once(tmp_path: Path) -> None:
    written: list[str] = []
    collector = ShardCollector(str(tmp_path), {"a.tar": 3, "b.tar": 2}, STORAGE, written.append)
    fresh = collector.add(pd.concat([rows("a.tar", ["a2", "a0"], 3.0), rows("b.tar", ["b0"], 4.0)]))
    assert [list(f["key"]) for f in fresh] == [["a2", "a0"], ["b0"]]
    assert written == [] and not list(tmp_path.glob("*.parquet"))
    # A retried task sends a0 again (other values): the first copy stays, and a is complete.
    fresh = collector.add(rows("a.tar", ["a0", "a1"], 9.0))
    assert [list(f["key"]) for f in fresh] == [["a1"]]
    assert written == ["a.tar"] == collector.written
    frame = pd.read_parquet(tmp_path / "a.parquet")
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert list(frame["key"]) == ["a0", "a1", "a2"]  # sorted by key
    assert list(frame["bits_per_dim"]) == [3.0, 9.0, 3.0]


def test_at_the_end_shards_with_skipped_images_are_written_and_empty_ones_are_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = {"a.tar": 3, "b.tar": 2, "c.tar": 1}
    collector = ShardCollector(str(tmp_path), expected, STORAGE)
    collector.add(rows("a.tar", ["a0", "a1"], 3.0))
    collector.add(rows("b.tar", ["b0"], 3.0))
    collector.close(skipped={"a.tar": 1, "c.tar": 1})
    assert sorted(collector.written) == ["a.tar", "b.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]
    assert len(pd.read_parquet(tmp_path / "b.parquet")) == 1
    messages = [r.getMessage() for r in caplog.records]
    # b lost an image nobody counted; c yielded nothing, so it has no file and a rerun retries it.
    assert any("shard b.tar: 1 images scored + 0 skipped, manifest says 2" in m for m in messages)
    assert not any("shard a.tar" in m for m in messages)
    assert any("no image of 1 shard(s) could be read (c.tar)" in m for m in messages)


def test_settings_are_recorded_then_other_settings_refused(tmp_path: Path) -> None:
    settings = {"split": "test", "source": "idx:x", "seed": 0, "draws": 1}
    check_settings(str(tmp_path), settings, STORAGE)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == settings
    check_settings(str(tmp_path), dict(settings), STORAGE)  # same settings: fine
    with pytest.raises(ScoreError) as error:
        check_settings(str(tmp_path), {**settings, "draws": 4}, STORAGE)
    assert "other settings (draws: 1; this run: 4)" in str(error.value)


def test_parquet_name_follows_the_shard() -> None:
    assert parquet_name("shard-000012.tar") == "shard-000012.parquet"
