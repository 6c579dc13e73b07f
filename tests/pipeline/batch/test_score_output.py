"""Scoring's output without Ray: the collector writes each shard's Parquet file once, when all its
rows are in (or, at the end, when its reader's outcome says it was read whole), keeps the first
copy of a repeated key, drops late duplicates, leaves out shards not read whole; the settings file
is created once and refuses to mix scores made with other settings or weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.batch.scoring.config import ScoreError
from pipeline.batch.scoring.output import (
    OUTPUT_COLUMNS,
    PREPARED_SHARDS_KEY,
    SETTINGS_FILE,
    SHARD_URL_KEY,
    SKIPPED_COUNT_KEY,
    SKIPPED_KEYS_KEY,
    ShardCollector,
    ShardTarget,
    check_settings,
    orphan_files,
    parquet_name,
    shard_file,
)
from pipeline.data.inputs import ShardRef
from pipeline.data.shards import ShardInfo
from pipeline.data.tally import ShardOutcome
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
    received: list[list[str]] = []
    collector = ShardCollector(
        str(tmp_path),
        {"a.tar": 3, "b.tar": 2},
        STORAGE,
        written.append,
        lambda frame: received.append(list(frame["key"])),
    )
    collector.add(pd.concat([rows("a.tar", ["a2", "a0"], 3.0), rows("b.tar", ["b0"], 4.0)]))
    assert written == [] == received and not list(tmp_path.glob("*.parquet"))
    # A retried task sends a0 again (other values): the first copy stays, and a is complete.
    collector.add(rows("a.tar", ["a0", "a1"], 9.0))
    assert written == ["a.tar"] == collector.written
    assert received == [["a2", "a0", "a1"]]  # the rows written, for the statistics
    frame = pd.read_parquet(tmp_path / "a.parquet")
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert list(frame["key"]) == ["a0", "a1", "a2"]  # sorted by key
    assert list(frame["bits_per_dim"]) == [3.0, 9.0, 3.0]


def outcome(shard: str, expected: int, rows: int, skipped=(), **kwargs) -> ShardOutcome:
    return ShardOutcome(
        shard=shard,
        expected=expected,
        rows=rows,
        complete=kwargs.pop("complete", True),
        skipped_keys=tuple(skipped),
        **kwargs,
    )


def test_late_rows_of_a_written_shard_are_dropped_and_never_rewrite_its_file(
    tmp_path: Path,
) -> None:
    collector = ShardCollector(str(tmp_path), {"a.tar": 2, "b.tar": 1}, STORAGE)
    collector.add(rows("a.tar", ["a0", "a1"], 3.0))
    written = tmp_path / "a.parquet"
    before = (written.read_bytes(), written.stat().st_mtime_ns)
    # A retried read task sends a.tar's rows again, with other values: duplicates.
    collector.add(pd.concat([rows("a.tar", ["a1", "a0"], 9.0), rows("b.tar", ["b0"], 4.0)]))
    collector.add(rows("a.tar", ["a0"], 7.0))
    collector.close({"a.tar": outcome("a.tar", 2, 2), "b.tar": outcome("b.tar", 1, 1)})
    assert (written.read_bytes(), written.stat().st_mtime_ns) == before
    assert list(pd.read_parquet(written)["bits_per_dim"]) == [3.0, 3.0]
    assert collector.late_rows == 3 and collector.written == ["a.tar", "b.tar"]


def test_at_the_end_only_shards_read_whole_are_written_and_the_others_left_out_with_why(
    tmp_path: Path,
) -> None:
    expected = {"a.tar": 3, "b.tar": 2, "c.tar": 2, "d.tar": 2, "e.tar": 1, "f.tar": 2}
    collector = ShardCollector(str(tmp_path), expected, STORAGE)
    collector.add(rows("a.tar", ["a0", "a2"], 3.0))  # a1 was a bad image
    collector.add(rows("b.tar", ["b0"], 3.0))  # then the shard's sha256 did not match
    collector.add(rows("c.tar", ["c0"], 3.0))  # its reader handed on 2 rows: one went missing
    collector.add(rows("f.tar", ["f0"], 3.0))  # no outcome reported at all
    truncated = "unreadable tar after 1 samples (unexpected end of data)"
    collector.close(
        {
            "a.tar": outcome("a.tar", 3, 2, skipped=["a1"]),
            "b.tar": outcome("b.tar", 2, 1, complete=False, reason="sha256 differs"),
            "c.tar": outcome("c.tar", 2, 2),
            "d.tar": outcome("d.tar", 2, 0, complete=False, reason=truncated, transient=True),
            "e.tar": outcome("e.tar", 1, 0, skipped=["e0"]),  # its one image was bad
        }
    )
    assert collector.written == ["a.tar", "e.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "e.parquet"]
    assert collector.left_out == {
        "b.tar": "sha256 differs",
        "c.tar": "1 rows arrived, its reader handed on 2",
        "d.tar": f"{truncated} (storage kept failing: a rerun retries it)",
        "f.tar": "its reader reported no outcome (1 rows arrived)",
    }
    # The bad images of a shard written short are in its Parquet metadata.
    a_meta = pq.read_schema(tmp_path / "a.parquet").metadata
    assert a_meta[SKIPPED_COUNT_KEY.encode()] == b"1"
    assert json.loads(a_meta[SKIPPED_KEYS_KEY.encode()]) == ["a1"]
    assert list(pd.read_parquet(tmp_path / "a.parquet")["key"]) == ["a0", "a2"]
    empty = pq.read_table(tmp_path / "e.parquet")
    assert empty.num_rows == 0 and empty.column_names == list(OUTPUT_COLUMNS)
    assert json.loads(empty.schema.metadata[SKIPPED_KEYS_KEY.encode()]) == ["e0"]


def test_without_outcomes_on_error_fail_writes_what_arrived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector = ShardCollector(str(tmp_path), {"a.tar": 3, "b.tar": 1}, STORAGE)
    collector.add(rows("a.tar", ["a0", "a1"], 3.0))
    collector.close(None)
    assert collector.written == ["a.tar"] and collector.left_out == {}
    meta = pq.read_schema(tmp_path / "a.parquet").metadata
    assert meta[SKIPPED_COUNT_KEY.encode()] == b"0"
    messages = [r.getMessage() for r in caplog.records]
    assert any("no image of 1 shard(s) could be read (b.tar)" in m for m in messages)


def test_a_file_another_job_wrote_first_is_kept(tmp_path: Path) -> None:
    first = ShardCollector(str(tmp_path), {"a.tar": 1}, STORAGE)
    first.add(rows("a.tar", ["a0"], 3.0))
    second = ShardCollector(str(tmp_path), {"a.tar": 1}, STORAGE)
    second.add(rows("a.tar", ["a0"], 5.0))
    assert second.written == ["a.tar"]
    assert list(pd.read_parquet(tmp_path / "a.parquet")["bits_per_dim"]) == [3.0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


SETTINGS = {"split": "test", "source": "idx:x", "seed": 0, "draws": 1, "weights_sha256": "aa11"}


def test_settings_are_recorded_then_other_settings_refused(tmp_path: Path) -> None:
    check_settings(str(tmp_path), SETTINGS, STORAGE)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == SETTINGS
    check_settings(str(tmp_path), dict(SETTINGS), STORAGE)  # same settings: fine
    with pytest.raises(ScoreError) as error:
        check_settings(str(tmp_path), {**SETTINGS, "draws": 4}, STORAGE)
    assert "other settings (draws: 1; this run: 4)" in str(error.value)
    # Another model under a reused name and version: both digests named.
    with pytest.raises(ScoreError) as error:
        check_settings(str(tmp_path), {**SETTINGS, "seed": 3, "weights_sha256": "bb22"}, STORAGE)
    assert "(seed, weights_sha256: 0, 'aa11'; this run: 3, 'bb22')" in str(error.value)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == SETTINGS  # never rewritten


def test_settings_of_an_earlier_version_without_the_weights_digest_are_refused_with_a_hint(
    tmp_path: Path,
) -> None:
    old = {k: v for k, v in SETTINGS.items() if k != "weights_sha256"}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(old))
    with pytest.raises(ScoreError) as error:
        check_settings(str(tmp_path), SETTINGS, STORAGE)
    assert "(weights_sha256: not recorded; this run: 'aa11')" in str(error.value)
    assert "add 'weights_sha256': 'aa11' to it" in error.value.hint


def test_parquet_name_follows_the_shard() -> None:
    assert parquet_name("shard-000012.tar") == "shard-000012.parquet"


def test_settings_without_a_noise_scheme_were_made_with_the_first_one(tmp_path: Path) -> None:
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(SETTINGS))  # before the scheme was kept
    check_settings(str(tmp_path), {**SETTINGS, "noise_scheme": "mt19937-v1"}, STORAGE)
    with pytest.raises(ScoreError) as error:
        check_settings(str(tmp_path), {**SETTINGS, "noise_scheme": "counter-v2"}, STORAGE)
    assert "(noise_scheme: 'mt19937-v1'; this run: 'counter-v2')" in str(error.value)


def marked(frame: pd.DataFrame, total: int) -> pd.DataFrame:
    """`frame` as a reader hands it on: the last row carries the shard's end marker."""
    return frame.assign(shard_rows=[-1] * (len(frame) - 1) + [total])


def test_the_end_marker_completes_a_shard_of_unknown_count_and_its_stale_file_goes(
    tmp_path: Path,
) -> None:
    url = "s3://b/photos/000001.tar"
    (tmp_path / "000001@0123456789ab.parquet").write_bytes(b"the old version's rows")
    target = ShardTarget(
        "000001@ba9876543210.parquet",
        url,
        metadata={SHARD_URL_KEY: url},
        stale=("000001@0123456789ab.parquet",),
    )
    asked: list[str] = []

    def outcome_of(shard: str) -> ShardOutcome:
        asked.append(shard)
        return outcome(shard, 3, 2, skipped=["k1"])

    collector = ShardCollector(str(tmp_path), {url: target}, STORAGE, outcome_of=outcome_of)
    first = rows(url, ["k0"], 3.0).assign(shard_rows=-1)
    collector.add(first)
    assert collector.written == [] and asked == []
    collector.add(marked(rows(url, ["k0", "k2"], 3.0), 2))  # k0 again (a retried task), then k2
    assert collector.written == [url] and asked == [url]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001@ba9876543210.parquet"]
    table = pq.read_table(tmp_path / "000001@ba9876543210.parquet")
    assert table.column("key").to_pylist() == ["k0", "k2"]
    assert table.column("orig_width").to_pylist() == [-1, -1]  # rows that did not carry it
    assert table.schema.metadata[SHARD_URL_KEY.encode()] == url.encode()
    assert json.loads(table.schema.metadata[SKIPPED_KEYS_KEY.encode()]) == ["k1"]


def test_a_prepared_shard_of_other_content_than_first_scored_gets_another_file() -> None:
    sha, other = "ab" * 32, "cd" * 32
    info = ShardInfo(name="shard-000001.tar", count=2, bytes=10240, sha256=sha)
    ref = ShardRef("/d/train/shard-000001.tar", "shard-000001.tar", 10240, "stat:1/2/3/4", info)
    assert shard_file(ref, {"shard-000001.tar": sha}) == "shard-000001.parquet"
    assert shard_file(ref, None) == "shard-000001.parquet"  # settings that predate the record
    assert shard_file(ref, {"shard-000001.tar": other}) == f"shard-000001@{sha[:12]}.parquet"
    assert shard_file(ref, {}) == f"shard-000001@{sha[:12]}.parquet"  # a shard added later


def test_the_prepared_shards_record_is_kept_never_compared(tmp_path: Path) -> None:
    check_settings(str(tmp_path), {**SETTINGS, PREPARED_SHARDS_KEY: {"a.tar": "11"}}, STORAGE)
    check_settings(str(tmp_path), {**SETTINGS, PREPARED_SHARDS_KEY: {"a.tar": "22"}}, STORAGE)
    recorded = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert recorded[PREPARED_SHARDS_KEY] == {"a.tar": "11"}


def test_a_file_of_a_shard_no_longer_listed_goes_just_before_its_keys_are_written_again(
    tmp_path: Path,
) -> None:
    for name, keys in (("old@0123456789ab.parquet", ["k0", "k1"]), ("gone@aa.parquet", ["g0"])):
        frame = rows("s3://b/" + name, keys, 1.0).drop(columns="png")
        frame.to_parquet(tmp_path / name)
    names = sorted(p.name for p in tmp_path.iterdir()) + [SETTINGS_FILE]
    orphans = orphan_files(names, {"new"})
    assert orphans == ("gone@aa.parquet", "old@0123456789ab.parquet")
    url = "s3://b/new.tar"
    target = ShardTarget("new@ba9876543210.parquet", url)
    collector = ShardCollector(str(tmp_path), {url: target}, STORAGE, orphans=orphans)
    collector.add(marked(rows(url, ["k0", "k1"], 3.0), 2))
    assert collector.retired == ["old@0123456789ab.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gone@aa.parquet",  # its keys are nowhere else: kept
        "new@ba9876543210.parquet",
    ]
