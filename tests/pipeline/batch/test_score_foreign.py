"""Scoring the user's own WebDataset shards in place (webdataset.ShardWriter, JPEGs of mixed sizes,
.json/.txt side members), on local disk and on S3: one row per decodable image under its original
key, shard URL and size before fitting; the same bits/dim as a prepared copy of the same images;
a growing prefix scored again reads only new and rewritten shards."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.batch.scoring.job import ScoreConfig, score
from pipeline.batch.scoring.output import (
    OUTPUT_COLUMNS,
    SETTINGS_FILE,
    SHARD_SIZE_KEY,
    SHARD_URL_KEY,
    SHARD_VERSION_KEY,
    SKIPPED_KEYS_KEY,
)
from pipeline.data.inputs import resolve_input
from tests.pipeline.data.foreign_shards import Photo, make_photos, upload, write_shards
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")


def config(trained: TrainedModel, input: str, output: str, **kwargs) -> ScoreConfig:
    return ScoreConfig(
        model=str(trained.directory),
        input=input,
        output=output,
        tracking_uri=trained.tracking_uri,
        batch_size=16,
        actors=1,
        least_likely=4,
        log_to_mlflow=False,
        **kwargs,
    )


def v12(version: str) -> str:
    return hashlib.sha256(version.encode()).hexdigest()[:12]


def files(prefix: str | Path) -> dict[str, int]:
    """{Parquet file name: mtime ns} under a local output prefix."""
    return {p.name: p.stat().st_mtime_ns for p in Path(prefix).glob("*.parquet")}


def empty_shard(path: Path) -> None:
    """A tar whose one sample has no image member (a caption only): a complete shard, 0 images."""
    with tarfile.open(path, "w") as archive:
        data = b"a caption, no image"
        info = tarfile.TarInfo("000000999.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def damaged(photos: list[Photo], index: int) -> list[Photo]:
    """`photos` with the JPEG of `photos[index]` cut short (its header decodes, its data not)."""
    bad = photos[index]
    return [
        dataclasses.replace(p, jpeg=p.jpeg[: len(p.jpeg) // 3]) if p is bad else p for p in photos
    ]


def test_foreign_shards_on_local_disk_one_row_per_decodable_image_under_its_key(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    photos = make_photos(11)
    write_shards(tmp_path / "photos", damaged(photos, 5), per_shard=4)  # 000000..000002
    empty_shard(tmp_path / "photos" / "000003.tar")
    spec = str(tmp_path / "photos" / "{000000..000003}.tar")
    plan = resolve_input(spec)
    cfg = config(trained_model, spec, str(tmp_path / "out"))

    result = score(cfg)
    assert result.status == "complete" and result.input_kind == "foreign"
    assert result.shards_new == 4 and result.shards_changed == 0 and result.listing_seconds > 0
    assert sorted(result.shards_written) == [ref.url for ref in plan.shards]
    # Skipped: the damaged JPEG, and the caption-only sample (no image member).
    assert result.images_scored == 10 and result.images_skipped == 2
    # One file per shard, named by its stem and version, saying which shard and version.
    assert sorted(files(result.output)) == sorted(
        f"{ref.stem}@{v12(ref.version)}.parquet" for ref in plan.shards
    )
    for ref in plan.shards:
        metadata = pq.read_schema(Path(result.output) / f"{ref.stem}@{v12(ref.version)}.parquet")
        meta = {k.decode(): v.decode() for k, v in metadata.metadata.items()}
        assert meta[SHARD_URL_KEY] == ref.url and meta[SHARD_VERSION_KEY] == ref.version
        assert meta[SHARD_SIZE_KEY] == str(ref.size)
    frame = pd.read_parquet(result.output)
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    good = [p for i, p in enumerate(photos) if i != 5]
    assert sorted(frame["key"]) == [p.key for p in good]  # the original keys, once each
    by_key = frame.set_index("key")
    for i, photo in enumerate(photos):
        if i == 5:
            continue
        row = by_key.loc[photo.key]
        assert (row["orig_width"], row["orig_height"]) == (photo.width, photo.height)
        assert row["shard"] == str(tmp_path / "photos" / f"{i // 4:06d}.tar")
        assert row["label"] == -1 and 0 < row["bits_per_dim"] < 16
    # The damaged image is named in its shard's file; the shard of no image has an empty file.
    second = plan.shards[1]
    meta = pq.read_schema(Path(result.output) / f"{second.stem}@{v12(second.version)}.parquet")
    assert json.loads(meta.metadata[SKIPPED_KEYS_KEY.encode()]) == [photos[5].key]
    last = plan.shards[3]
    empty = pq.read_table(Path(result.output) / f"{last.stem}@{v12(last.version)}.parquet")
    assert empty.num_rows == 0 and empty.column_names == list(OUTPUT_COLUMNS)
    assert json.loads(empty.schema.metadata[SKIPPED_KEYS_KEY.encode()]) == ["000000999"]
    settings = json.loads((Path(result.output) / SETTINGS_FILE).read_text())
    assert settings["input"] == str(tmp_path / "photos")
    assert settings["noise_scheme"]

    # Nothing new: nothing read, the empty shard included, and no file touched.
    before = files(result.output)
    again = score(cfg)
    assert again.shards_written == () and again.shards_already_done == 4
    assert files(result.output) == before


def test_foreign_shards_on_s3(trained_model: TrainedModel, tmp_path: Path, s3) -> None:  # noqa: F811
    import pyarrow.dataset as pads

    from pipeline.storage import arrow_filesystem

    photos = make_photos(7)
    upload(write_shards(tmp_path / "photos", photos, per_shard=3), f"{s3.url}/photos", s3.storage)
    spec = f"{s3.url}/photos/{{000000..000002}}.tar"
    cfg = dataclasses.replace(config(trained_model, spec, f"{s3.url}/scores"), storage=s3.storage)
    result = score(cfg)
    assert result.status == "complete" and result.images_scored == 7
    filesystem, path = arrow_filesystem(result.output, s3.storage)
    frame = pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pandas()
    assert sorted(frame["key"]) == [p.key for p in photos]
    by_key = frame.set_index("key")
    for i, photo in enumerate(photos):
        assert by_key.loc[photo.key, "shard"] == f"{s3.url}/photos/{i // 3:06d}.tar"
        assert by_key.loc[photo.key, "orig_width"] == photo.width
        assert by_key.loc[photo.key, "orig_height"] == photo.height
    again = score(cfg)
    assert again.shards_written == () and again.shards_already_done == 3


def test_prepared_and_in_place_give_bit_identical_bits_per_dim(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The same JPEGs scored in place and after `prepare --source webdataset:`. The photos carry
    the keys prepare gives ("train-<index>"): the dequantization noise is keyed by the image's
    key, so only equal keys can give equal numbers; equal pixels do the rest."""
    from pipeline.data.shards import prepare
    from pipeline.data.sources import open_source

    photos = [dataclasses.replace(p, key=f"train-{i:08d}") for i, p in enumerate(make_photos(9))]
    write_shards(tmp_path / "photos", photos, per_shard=4)
    spec = str(tmp_path / "photos")
    prepare(open_source(f"webdataset:{spec}", channels=1, size=(28, 28)), str(tmp_path / "data"))
    in_place = score(config(trained_model, spec, str(tmp_path / "in-place")))
    prepared = score(config(trained_model, str(tmp_path / "data" / "train"), str(tmp_path / "p")))
    assert in_place.input_kind == "foreign" and prepared.input_kind == "prepared"
    a = pd.read_parquet(in_place.output).set_index("key").sort_index()
    b = pd.read_parquet(prepared.output).set_index("key").sort_index()
    assert list(a.index) == list(b.index) == [p.key for p in photos]
    for column in ("log_likelihood", "bits_per_dim", "png_bits_per_dim", "ood_score"):
        assert a[column].tolist() == b[column].tolist(), column  # bit for bit
    assert set(b["orig_width"]) == {-1} and a["orig_width"].tolist() == [p.width for p in photos]


def test_a_growing_prefix_scores_only_new_and_rewritten_shards(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    photos = make_photos(15)
    write_shards(folder, photos[:9], per_shard=3)  # 000000..000002
    cfg = config(trained_model, str(folder), str(tmp_path / "out"))
    first = score(cfg)
    assert first.shards_new == 3 and first.images_scored == 9

    # Two new drops: only they are read.
    before = files(first.output)
    write_shards(folder, photos[9:15], per_shard=3, start_shard=3)
    second = score(cfg)
    assert sorted(second.shards_written) == [str(folder / f"00000{i}.tar") for i in (3, 4)]
    assert second.shards_new == 2 and second.shards_changed == 0
    assert second.shards_already_done == 3 and second.images_scored == 6
    after = files(first.output)
    assert len(after) == 5 and all(after[name] == mtime for name, mtime in before.items())

    # Shard 000001 rewritten in place with other images under its keys: only it is scored
    # again, and its file of the old version goes.
    old = next(name for name in after if name.startswith("000001@"))
    rewritten = [
        dataclasses.replace(new, key=photo.key)
        for photo, new in zip(photos[3:6], make_photos(12)[9:12])
    ]
    write_shards(folder, rewritten, per_shard=3, start_shard=1)
    stat = (folder / "000001.tar").stat()
    os.utime(folder / "000001.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = score(cfg)
    assert third.shards_written == (str(folder / "000001.tar"),)
    assert third.shards_changed == 1 and third.shards_new == 0 and third.shards_already_done == 4
    final = files(first.output)
    assert old not in final and len(final) == 5
    assert all(final[name] == after[name] for name in after if not name.startswith("000001@"))
    frame = pd.read_parquet(first.output)
    assert len(frame) == 15 == frame["key"].nunique()
    widths = frame.set_index("key")["orig_width"]
    assert [widths[p.key] for p in rewritten] == [p.width for p in make_photos(12)[9:12]]
