"""Reading foreign WebDataset shards in place: one row per decodable image keyed by the original
keys, fitted with prepare's rules (bit-identical to a prepared read), from local disk and S3,
with Ray Data and without; bad members skipped and counted with shard and key, or raised."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.images import decode_fitted
from pipeline.data.inputs import InputError, resolve_input
from pipeline.data.reader import COLUMNS, iter_input, read_input
from pipeline.data.shards import prepare
from pipeline.data.sources import FolderSource, open_source
from pipeline.data.tally import CorruptDataError, SkipTally
from pipeline.storage import join_url
from tests.pipeline.data.foreign_shards import Photo, make_photos, upload, write_shards

SHAPE = (3, 24, 32)  # not square: the centre crop matters


def _ray_rows(dataset) -> list[dict]:
    rows = []
    for batch in dataset.iter_batches(batch_size=7, batch_format="numpy"):
        rows += [{c: batch[c][i] for c in batch} for i in range(len(batch["key"]))]
    return sorted(rows, key=lambda r: r["key"])


@pytest.fixture
def photos() -> list[Photo]:
    return make_photos(17)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("reader", ["iter", "ray"])
def test_foreign_shards_read_as_one_row_per_image_keyed_by_the_original_keys(
    tmp_path, request, photos, where, reader
):
    paths = write_shards(tmp_path / "photos", photos, per_shard=5)
    storage = None
    urls = [str(p) for p in paths]
    prefix = str(tmp_path / "photos")
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        prefix, storage = join_url(s3.url, "photos"), s3.storage
        urls = upload(paths, prefix, storage)
    spec = join_url(prefix, "{000000..000003}.tar")
    if reader == "ray":
        request.getfixturevalue("ray_local")
        tally = SkipTally.shared()
        rows = _ray_rows(read_input(spec, storage, shape=SHAPE, on_error="skip", tally=tally))
    else:
        tally = SkipTally()
        rows = list(iter_input(spec, storage, shape=SHAPE, on_error="skip", tally=tally))

    assert [r["key"] for r in rows] == [p.key for p in photos]
    assert set(rows[0]) == set(COLUMNS)
    for i, (row, photo) in enumerate(zip(rows, photos)):
        assert row["shard"] == urls[i // 5]
        assert (row["orig_width"], row["orig_height"]) == (photo.width, photo.height)
        assert row["label"] == -1 and row["nbytes"] == len(photo.jpeg)
        want = decode_fitted(photo.jpeg, 3, SHAPE[1:]).pixels
        assert row["image"].dtype == np.uint8 and row["image"].shape == SHAPE
        np.testing.assert_array_equal(row["image"], want)
    # The end marker: exactly one row per shard carries the shard's row count.
    ends = {row["shard"]: int(row["shard_rows"]) for row in rows if row["shard_rows"] >= 0}
    assert ends == {urls[0]: 5, urls[1]: 5, urls[2]: 5, urls[3]: 2}
    outcomes = tally.outcomes()
    assert sorted(outcomes) == urls
    assert all(o.complete and o.expected == o.rows for o in outcomes.values())
    assert [outcomes[u].rows for u in urls] == [5, 5, 5, 2]
    assert all(outcomes[r.url].version == r.version for r in resolve_input(spec, storage).shards)
    assert tally.total() == 0


def test_prepared_and_in_place_reads_give_bit_identical_pixels(tmp_path, photos):
    """The same JPEG bytes: read in place, re-sharded by prepare (webdataset: source), and
    prepared from a folder of the same files, all give the same pixels."""
    write_shards(tmp_path / "photos", photos, per_shard=6)
    spec = str(tmp_path / "photos")
    in_place = {r["key"]: r for r in iter_input(spec, shape=SHAPE)}

    source = open_source(f"webdataset:{spec}", size=SHAPE[1:])
    prepare(source, str(tmp_path / "data"), shard_samples=4)
    prepared = list(iter_input(str(tmp_path / "data" / "train"), shape=SHAPE))
    assert len(prepared) == len(photos) == len(in_place)
    for row, photo in zip(prepared, photos):
        np.testing.assert_array_equal(row["image"], in_place[photo.key]["image"])

    folder = tmp_path / "files"
    folder.mkdir()
    for photo in photos:
        (folder / f"{photo.key}.jpg").write_bytes(photo.jpeg)
    files = FolderSource(str(folder), size=SHAPE[1:])
    for item in files.read("train", range(len(photos))):
        np.testing.assert_array_equal(item.image, in_place[item.key[:-4]]["image"])

    # And a prepared split read through the same entry point: URL-keyed, sizes unknown.
    via = list(iter_input(str(tmp_path / "data" / "train"), shape=SHAPE))
    assert [r["key"] for r in via] == [r["key"] for r in prepared]
    assert via[0]["shard"] == str(tmp_path / "data" / "train" / "shard-000000.tar")
    assert {(r["orig_width"], r["orig_height"]) for r in via} == {(-1, -1)}
    assert sorted(int(r["shard_rows"]) for r in via if r["shard_rows"] >= 0) == [1, 4, 4, 4, 4]
    with pytest.raises(InputError, match=r"shape \[3, 24, 32\].*expected \[3, 32, 32\]"):
        list(iter_input(str(tmp_path / "data" / "train"), shape=(3, 32, 32)))


def _corrupt(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 3]  # a JPEG cut short: its header is fine, its data is not


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_corrupt_jpeg_member_is_skipped_and_counted_with_its_shard_and_key(
    tmp_path, request, photos, where
):
    bad = photos[7]
    damaged = [
        Photo(p.key, _corrupt(p.jpeg), p.width, p.height, None) if p is bad else p for p in photos
    ]
    paths = write_shards(tmp_path / "photos", damaged, per_shard=5)
    storage, prefix = None, str(tmp_path / "photos")
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        prefix, storage = join_url(s3.url, "photos"), s3.storage
        upload(paths, prefix, storage)
    shard = join_url(prefix, "000001.tar")
    tally = SkipTally()
    rows = list(iter_input(prefix, storage, shape=SHAPE, on_error="skip", tally=tally))
    assert [r["key"] for r in rows] == [p.key for p in photos if p is not bad]
    outcome = tally.outcomes()[shard]
    assert outcome.complete and outcome.rows == 4 and outcome.expected == 5
    assert outcome.skipped_keys == (bad.key,)
    (record,) = tally.records()
    assert (record.shard, record.key) == (shard, bad.key)
    assert "cannot decode" in record.reason or "truncated" in record.reason
    assert tally.outcomes()[shard].lost == 1 and tally.total() == 1

    with pytest.raises(CorruptDataError) as failed:
        list(iter_input(prefix, storage, shape=SHAPE))
    assert (failed.value.shard, failed.value.key) == (shard, bad.key)
