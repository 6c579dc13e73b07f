"""`prepare --source webdataset:<spec>`: foreign shards re-sharded into a prepared split (fixed
size, PNG, manifest), on S3 with Ray tasks too, with prepare's skip/fail policy for bad members,
truncated and missing shards; the CLI takes the source as it takes the others."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.prepare import main as prepare_main
from pipeline.data.reader import iter_input
from pipeline.data.shards import PrepareError, load_manifest, prepare, shard_key
from pipeline.data.sources import SourceError, open_source
from pipeline.storage import join_url
from tests.pipeline.data.foreign_shards import Photo, make_photos, upload, write_shards


def test_foreign_shards_on_s3_re_shard_into_a_prepared_split_with_ray_tasks(
    tmp_path, s3, ray_local
):
    photos = make_photos(14, labels=True)
    prefix = join_url(s3.url, "photos")
    upload(write_shards(tmp_path / "photos", photos, per_shard=4), prefix, s3.storage)
    spec = join_url(prefix, "{000000..000003}.tar")
    source = open_source(f"webdataset:{spec}", s3.storage, channels=1, size=(20, 20))
    assert source.splits() == {"train": 14} and source.has_labels and source.shape == (1, 20, 20)
    out = join_url(s3.url, "prepared")
    result = prepare(source, out, s3.storage, shard_samples=5, workers=2)
    manifest = load_manifest(join_url(out, "train"), s3.storage)
    assert [s.count for s in manifest.shards] == [5, 5, 4] and manifest.has_labels
    assert manifest.source.startswith(f"webdataset:{spec}#")
    rows = list(iter_input(join_url(out, "train"), s3.storage, shape=(1, 20, 20)))
    assert [r["key"] for r in rows] == [shard_key("train", i) for i in range(14)]
    assert [r["label"] for r in rows] == [p.label for p in photos]
    in_place = list(iter_input(spec, s3.storage, shape=(1, 20, 20)))
    for prepared, original in zip(rows, in_place):
        np.testing.assert_array_equal(prepared["image"], original["image"])
    assert result.splits["train"].shards_written == 3
    again = prepare(
        open_source(f"webdataset:{spec}", s3.storage, 1, (20, 20)), out, s3.storage, shard_samples=5
    )
    train = again.splits["train"]
    assert (train.shards_written, train.shards_skipped) == (0, 3)


def _damaged(tmp_path) -> tuple[str, list[Photo]]:
    """3 shards of 4: a corrupt JPEG at key 5, the last shard truncated, a fourth named but
    missing."""
    photos = make_photos(12)
    photos[5] = Photo(photos[5].key, photos[5].jpeg[:300], 1, 1, None)
    paths = write_shards(tmp_path / "photos", photos, per_shard=4)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])
    return str(tmp_path / "photos" / "{000000..000003}.tar"), photos


def test_bad_members_damaged_and_missing_shards_follow_the_skip_policy(tmp_path):
    spec, photos = _damaged(tmp_path)
    source = open_source(f"webdataset:{spec}", size=(16, 16))
    readable = [c for c in source.counts]
    assert readable[:2] == [4, 4] and readable[2] < 4 and source.damage[2]
    result = prepare(source, str(tmp_path / "out"), shard_samples=100, on_error="skip")
    manifest = result.splits["train"].manifest
    # key 5 undecodable, the truncated shard's damage, the missing shard: 3 bad inputs.
    assert manifest.skipped_inputs == 3
    assert manifest.count == 8 - 1 + readable[2]


def test_a_bad_member_stops_prepare_under_fail_naming_shard_and_key(tmp_path):
    spec, photos = _damaged(tmp_path)
    source = open_source(f"webdataset:{spec}", size=(16, 16))
    with pytest.raises(PrepareError) as failed:
        prepare(source, str(tmp_path / "out"), shard_samples=100)
    assert f"{tmp_path / 'photos' / '000001.tar'}#{photos[5].key}" in str(failed.value)


def test_the_cli_prepares_a_webdataset_source_and_refuses_one_without_a_size(tmp_path, capsys):
    write_shards(tmp_path / "photos", make_photos(7), per_shard=3)
    out = tmp_path / "data"
    code = prepare_main(
        ["--source", f"webdataset:{tmp_path / 'photos'}", "--output", str(out), "--size", "12x12"]
        + ["--val-fraction", "0.3", "--shard-samples", "2"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert load_manifest(str(out / "train")).count + load_manifest(str(out / "val")).count == 7
    assert load_manifest(str(out / "train")).shape == (3, 12, 12)
    code = prepare_main(["--source", f"webdataset:{tmp_path / 'photos'}", "--output", str(out)])
    assert code == 2 and "--size" in capsys.readouterr().err
    with pytest.raises(SourceError, match="prepared already"):
        open_source(f"webdataset:{out / 'train'}", size=(12, 12))
