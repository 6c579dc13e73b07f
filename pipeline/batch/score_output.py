"""Scoring's output: one Parquet file per shard, written once the shard is complete, so every key
lands exactly once across crashes, retries and reruns.

    <output>/model=<name>/version=<v>/_scoring.json          seed, draws, split: what the files mean
    <output>/model=<name>/version=<v>/shard-000000.parquet    the rows of shard-000000.tar

`ShardCollector` receives the score rows as the pipeline streams them, groups them by shard (the
first copy of each key wins, in case a task is retried) and writes a shard's file as soon as all
its manifest count has arrived; when the stream ends, the shards left are written with what they
got (their other images were skipped). Each file is written atomically (local: temp name in the
same folder, then rename; S3: one PUT, visible only when complete), so a file present means its
shard is done, and a rerun scores only the shards without one. Memory stays bounded: the driver
holds the small score rows of the shards being read, never images or the whole dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.batch.score_config import ScoreError
from pipeline.storage import (
    StorageConfig,
    join_url,
    list_names,
    make_temp_file,
    read_bytes,
    replace_with,
    write_bytes_atomic,
)

__all__ = [
    "OUTPUT_COLUMNS",
    "SETTINGS_FILE",
    "ShardCollector",
    "check_settings",
    "output_prefix",
    "parquet_name",
]

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = (
    "key",
    "shard",
    "label",
    "log_likelihood",
    "bits_per_dim",
    "png_bits_per_dim",
    "ood_score",
)
SETTINGS_FILE = "_scoring.json"


def output_prefix(output: str, name: str, version: str) -> str:
    """`<output>/model=<name>/version=<version>`: where one model version's scores go."""
    return join_url(output, f"model={name}", f"version={version}")


def parquet_name(shard: str) -> str:
    """The output file of input shard `shard`: shard-000000.tar -> shard-000000.parquet."""
    return shard.rsplit(".", 1)[0] + ".parquet"


def check_settings(prefix: str, settings: dict[str, Any], storage: StorageConfig) -> None:
    """Record what the files under `prefix` mean, or refuse to mix results of other settings."""
    url = join_url(prefix, SETTINGS_FILE)
    if SETTINGS_FILE in list_names(prefix, storage):
        found = json.loads(read_bytes(url, storage))
        if found != settings:
            differ = sorted(k for k in settings if found.get(k) != settings[k])
            raise ScoreError(
                f"{prefix} holds scores made with other settings ({', '.join(differ)}: "
                f"{', '.join(f'{found.get(k)!r}' for k in differ)}; this run: "
                f"{', '.join(f'{settings[k]!r}' for k in differ)})",
                hint="write to another --output, or rerun with the settings used before",
            )
        return
    write_bytes_atomic(url, json.dumps(settings, indent=1).encode(), storage)


def _write_shard(prefix: str, shard: str, frame: pd.DataFrame, storage: StorageConfig) -> str:
    """Write one shard's rows as Parquet, atomically (temp file, then rename or a single upload)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = join_url(prefix, parquet_name(shard))
    frame = frame.sort_values("key", kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(frame[list(OUTPUT_COLUMNS)], preserve_index=False)
    temp = make_temp_file(url)  # ".<name>.tmp-<pid>-<id>": readers skip dot-files
    pq.write_table(table, temp)
    replace_with(temp, url, storage)
    return url


@dataclass
class _Partial:
    """Rows received for one shard so far."""

    frames: list[pd.DataFrame] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)


class ShardCollector:
    """Groups streamed score rows by shard and writes each shard's file once (module docstring).

    Args:
        prefix: the model version's output folder (see output_prefix).
        expected: images per pending shard, from the manifest.
        storage: where `prefix` lives.
        on_written: called with a shard's name after its file is in place.
    """

    def __init__(
        self,
        prefix: str,
        expected: dict[str, int],
        storage: StorageConfig,
        on_written: Callable[[str], None] | None = None,
    ) -> None:
        self.prefix, self.expected, self.storage = prefix, expected, storage
        self.on_written = on_written
        self.written: list[str] = []
        self._partial: dict[str, _Partial] = {}

    def add(self, batch: pd.DataFrame) -> list[pd.DataFrame]:
        """Take a batch of score rows; returns the rows not seen before, one frame per shard.
        A shard whose rows are all in is written before this returns."""
        fresh_frames = []
        for shard, rows in batch.groupby("shard", sort=False):
            state = self._partial.setdefault(str(shard), _Partial())
            # A retried read task may send rows again: keep the first copy of each key.
            fresh = rows[~rows["key"].isin(state.keys)].drop_duplicates("key")
            if fresh.empty:
                continue
            state.keys.update(fresh["key"])
            state.frames.append(fresh.drop(columns="png"))
            fresh_frames.append(fresh)
            if len(state.keys) == self.expected[str(shard)]:
                self._finish(str(shard))
        return fresh_frames

    def close(self, skipped: dict[str, int]) -> None:
        """The stream has ended: every shard left holds all it will get (`skipped`: images per
        shard the readers skipped). Writes them, and warns about shards that got no row."""
        for shard in sorted(self._partial):
            got, lost = len(self._partial[shard].keys), skipped.get(shard, 0)
            if got + lost != self.expected[shard]:
                logger.warning(
                    "shard %s: %d images scored + %d skipped, manifest says %d",
                    shard,
                    got,
                    lost,
                    self.expected[shard],
                )
            self._finish(shard)
        missing = sorted(set(self.expected) - set(self.written))
        if missing:
            logger.warning(
                "no image of %d shard(s) could be read (%s): no file written, a rerun retries them",
                len(missing),
                ", ".join(missing[:5]),
            )

    def _finish(self, shard: str) -> None:
        rows = self._partial.pop(shard)
        _write_shard(self.prefix, shard, pd.concat(rows.frames, ignore_index=True), self.storage)
        self.written.append(shard)
        if self.on_written is not None:
            self.on_written(shard)
