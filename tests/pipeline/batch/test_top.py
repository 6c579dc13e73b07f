"""`flowray scores top`: the n highest bits/dim (or OOD scores) across every Parquet file of a
model version, read batch by batch; shard names resolved to URLs; the grid drawn from the
shards themselves (foreign on S3, prepared on disk)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs.cli import main as flowray
from pipeline.batch.scoring.config import ScoreError
from pipeline.batch.scoring.output import OUTPUT_COLUMNS
from pipeline.batch.top import draw_top, top_scores
from pipeline.data.images import decode_fitted
from pipeline.data.reader import iter_input
from pipeline.data.shards import prepare
from pipeline.data.sources import open_source
from pipeline.storage import fsspec_filesystem, join_url
from tests.pipeline.data.foreign_shards import make_photos, upload, write_shards


def _write_scores(prefix: str, name: str, frame: pd.DataFrame, storage=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = fsspec_filesystem(join_url(prefix, name), storage)
    fs.makedirs(fs._parent(path), exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame[list(OUTPUT_COLUMNS)], preserve_index=False), buffer)
    fs.pipe_file(path, buffer.getvalue())


def _frame(keys, shards, bits, ood=None) -> pd.DataFrame:
    bits = np.asarray(bits, dtype=np.float64)
    return pd.DataFrame(
        {
            "key": keys,
            "shard": shards,
            "label": np.full(len(keys), -1),
            "log_likelihood": -bits,
            "bits_per_dim": bits,
            "png_bits_per_dim": np.zeros(len(keys)),
            "ood_score": bits if ood is None else np.asarray(ood, dtype=np.float64),
            "flagged": np.zeros(len(keys), dtype=bool),
            "orig_width": np.full(len(keys), -1),
            "orig_height": np.full(len(keys), -1),
        }
    )


def test_top_n_across_files_and_batches_equals_a_full_sort(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "out" / "model=flow" / "version=2")
    frames = []
    for f in range(5):
        n = 997
        bits = np.round(rng.normal(3.0, 0.5, n), 2)  # rounded: many ties to break
        bits[rng.integers(0, n, 3)] = np.nan
        frame = _frame(
            [f"k{f}-{i:04d}" for i in range(n)],
            [f"s3://bucket/photos/{f:06d}.tar"] * n,
            bits,
            ood=-bits,
        )
        _write_scores(prefix, f"{f:06d}.parquet", frame)
        frames.append(frame)
    _write_scores(str(tmp_path / "out" / "model=flow" / "version=1"), "x.parquet", frames[0])
    everything = pd.concat(frames)
    finite = everything.dropna(subset=["bits_per_dim"])
    unusual = everything[everything["bits_per_dim"].isna()].sort_values(["shard", "key"])

    result = top_scores(str(tmp_path / "out"), "flow", n=25, batch_rows=100)
    assert (result.version, result.files_read, result.rows_read) == ("2", 5, 5 * 997)
    assert result.non_finite_scores == 15
    expected = finite.sort_values(
        ["bits_per_dim", "shard", "key"], ascending=[False, True, True]
    ).head(10)
    # The 15 NaN scores rank first (by shard and key), then the highest finite ones.
    assert [r.key for r in result.rows] == list(unusual["key"]) + list(expected["key"])
    assert [r.rank for r in result.rows] == list(range(1, 26))
    assert result.rows[15].shard_url == expected["shard"].iloc[0]

    by_ood = top_scores(str(tmp_path / "out"), "flow/2", n=20, by="ood_score", batch_rows=64)
    lowest = finite.sort_values(["bits_per_dim", "shard", "key"]).head(5)
    assert [r.key for r in by_ood.rows[:15]] == list(unusual["key"])
    assert {r.key for r in by_ood.rows[15:]} == set(lowest["key"])
    with pytest.raises(ScoreError, match="no scores of model other"):
        top_scores(str(tmp_path / "out"), "other")


def test_a_relative_output_finds_the_newest_version(tmp_path, monkeypatch):
    """`--output flowray-work/scores --model fashion-flow`, as a user types it after the demo."""
    frame = _frame(["a", "b"], ["shard-000000.tar"] * 2, [3.0, 4.0])
    _write_scores(
        str(tmp_path / "work" / "scores" / "model=flow" / "version=1"), "x.parquet", frame
    )
    _write_scores(
        str(tmp_path / "work" / "scores" / "model=flow" / "version=2"), "x.parquet", frame
    )
    monkeypatch.chdir(tmp_path)

    result = top_scores("work/scores", "flow", n=1)

    assert (result.version, [r.key for r in result.rows]) == ("2", ["b"])


def test_non_finite_scores_rank_as_the_most_unusual(tmp_path, capsys):
    inf, nan = float("inf"), float("nan")
    prefix = str(tmp_path / "out" / "model=flow" / "version=1")
    bits = [3.0, inf, 9.0, nan, -inf, 4.0]
    ood = [1.0, inf, 2.0, nan, -inf, 8.0]
    keys = [f"k{i}" for i in range(6)]
    _write_scores(prefix, "a.parquet", _frame(keys, ["s3://b/x.tar"] * 6, bits, ood=ood))

    by_bits = top_scores(str(tmp_path / "out"), "flow", n=4, batch_rows=2)
    assert [r.key for r in by_bits.rows] == ["k1", "k3", "k4", "k2"]  # +inf, NaN, -inf, 9.0
    assert by_bits.non_finite_scores == 3
    by_ood = top_scores(str(tmp_path / "out"), "flow", n=5, by="ood_score")
    assert [r.key for r in by_ood.rows] == ["k1", "k3", "k4", "k5", "k2"]
    assert flowray(["scores", "top", "--output", str(tmp_path / "out"), "--model", "flow"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[:4] == ["1", "inf", "inf", "inf"]


def test_the_grid_shows_the_images_from_foreign_shards_on_s3(tmp_path, s3):
    photos = make_photos(9)
    prefix = join_url(s3.url, "photos")
    urls = upload(write_shards(tmp_path / "photos", photos, per_shard=4), prefix, s3.storage)
    rows = list(iter_input(prefix, s3.storage, shape=(3, 16, 16)))
    bits = np.arange(len(rows), dtype=np.float64)  # the last photo is the least likely
    out = join_url(s3.url, "scores")
    version = join_url(out, "model=flow", "version=1")
    frame = _frame([r["key"] for r in rows], [r["shard"] for r in rows], bits)
    _write_scores(version, "000000.parquet", frame, s3.storage)

    result = top_scores(out, "flow/1", s3.storage, n=3)
    assert [r.key for r in result.rows] == [photos[8].key, photos[7].key, photos[6].key]
    assert [r.shard_url for r in result.rows] == [urls[2], urls[1], urls[1]]
    png = draw_top(result, s3.storage, shape=(3, 16, 16))
    assert Image.open(io.BytesIO(png)).size[0] > 100
    from pipeline.data.reader import fetch_images

    fetched = fetch_images(urls[1], [photos[7].key, "absent"], (3, 16, 16), s3.storage)
    assert set(fetched) == {photos[7].key}
    want = decode_fitted(photos[7].jpeg, 3, (16, 16)).pixels
    np.testing.assert_array_equal(fetched[photos[7].key].pixels, want)


def test_the_cli_prints_the_top_and_draws_prepared_shards_named_without_urls(tmp_path, capsys):
    write_shards(tmp_path / "photos", make_photos(6), per_shard=3)
    source = open_source(f"webdataset:{tmp_path / 'photos'}", size=(12, 12))
    prepare(source, str(tmp_path / "data"), shard_samples=3)
    split = str(tmp_path / "data" / "train")
    version = tmp_path / "scores" / "model=flow" / "version=4"
    keys = [f"train-{i:08d}" for i in range(6)]
    shards = ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3
    _write_scores(str(version), "shard-000000.parquet", _frame(keys, shards, [1, 5, 2, 3, 4, 0]))
    summary = version / "_summary" / "20261129T000000Z" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"input": split}))
    grid = tmp_path / "least_likely.png"
    code = flowray(
        ["scores", "top", "--output", str(tmp_path / "scores"), "--model", "flow", "-n", "2"]
        + ["--grid", str(grid), "--tile", "12"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "model=flow version=4: 2 least likely of 6 images (by bits_per_dim) in 1 files" in out
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["1", "5.0000", "5.0000"]
    assert lines[2].endswith(f"train-00000001  {split}/shard-000000.tar")
    assert lines[3].endswith(f"train-00000004  {split}/shard-000001.tar")
    assert Image.open(grid).format == "PNG"
    code = flowray(["scores", "top", "--output", str(tmp_path / "scores"), "--model", "nope"])
    assert code == 2 and "no scores of model nope" in capsys.readouterr().err
