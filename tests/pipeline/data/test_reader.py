"""Reading splits: Ray Data and the plain iterator give the source's keys, pixels and labels back,
from local disk and S3; shard subsets; shuffling; every corruption case under skip and fail."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.reader import CorruptDataError, SkipTally, iter_split, read_split
from pipeline.data.shards import ManifestError, encode_png, prepare, shard_key
from pipeline.data.sources import FolderSource, fit_image, open_source
from pipeline.storage import fsspec_filesystem, join_url, put_file_atomic


def _ray_rows(ds) -> list[dict]:
    rows = []
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for i in range(len(batch["key"])):
            rows.append({column: batch[column][i] for column in batch})
    return sorted(rows, key=lambda r: r["key"])


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["key"] for r in got] == [r["key"] for r in want]
    for a, b in zip(got, want):
        assert (a["shard"], int(a["label"]), int(a["nbytes"])) == (
            b["shard"],
            int(b["label"]),
            int(b["nbytes"]),
        )
        assert a["image"].dtype == np.uint8
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.fixture
def fmnist(fashion_mnist_dir):
    return open_source(f"idx:{fashion_mnist_dir}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fashion_mnist_round_trips_through_ray_data(fmnist, tmp_path, request, ray_local, where):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        out, storage = join_url(s3.url, "fmnist"), s3.storage
    else:
        out, storage = str(tmp_path), None
    prepare(fmnist, out, storage, splits=["train"], limit=300, shard_samples=100)
    split = join_url(out, "train")
    rows = _ray_rows(read_split(split, storage))
    expected = list(fmnist.read("train", range(300)))
    assert [r["key"] for r in rows] == [shard_key("train", i) for i in range(300)]
    for i, (row, source) in enumerate(zip(rows, expected)):
        assert row["shard"] == f"shard-00000{i // 100}.tar"
        assert row["label"] == source.label
        assert row["image"].shape == (1, 28, 28)
        np.testing.assert_array_equal(row["image"], source.image)
    assert all(row["nbytes"] == len(encode_png(row["image"])) for row in rows[:5])
    # The plain iterator goes through the same decode path: identical rows, in shard order.
    _assert_same_rows(list(iter_split(split, storage)), rows)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_photo_folder_round_trips_losslessly(photo_folder, tmp_path, request, ray_local, where):
    folder, storage, out = str(photo_folder), None, str(tmp_path / "out")
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        storage, out = s3.storage, join_url(s3.url, "photo-shards")
        folder = join_url(s3.url, "photos")
        for path in sorted(photo_folder.rglob("*.*")):
            put_file_atomic(
                str(path), join_url(folder, str(path.relative_to(photo_folder))), storage
            )
    source = FolderSource(folder, storage, channels=3, size=(32, 32))
    prepare(source, out, storage, shard_samples=7)
    rows = _ray_rows(read_split(join_url(out, "train"), storage))
    assert len(rows) == 18
    classes = ["astronaut", "chelsea", "coffee"]
    for row, relative in zip(rows, source.files):
        # JPEG inputs are decoded once; what the shard holds is that decode, exactly.
        with Image.open(photo_folder / relative) as image:
            expected = fit_image(image, 3, (32, 32))
        np.testing.assert_array_equal(row["image"], expected)
        assert row["label"] == classes.index(relative.split("/")[0])
    first = np.asarray(Image.open(photo_folder / "astronaut" / "patch-0.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(rows[0]["image"], first)


@pytest.fixture
def split(fmnist, tmp_path) -> str:
    """150 test images in 3 shards of 50 at <tmp>/test."""
    prepare(fmnist, str(tmp_path), splits=["test"], limit=150, shard_samples=50)
    return str(tmp_path / "test")


def test_a_subset_of_shards_is_read_alone(split):
    rows = list(iter_split(split, shards=["shard-000002.tar", "shard-000000.tar"]))
    keys = [r["key"] for r in rows]
    assert keys == [shard_key("test", i) for i in [*range(100, 150), *range(50)]]
    with pytest.raises(ValueError, match="no shard 'shard-000007.tar'"):
        iter_split(split, shards=["shard-000007.tar"])


def test_shuffle_changes_order_not_content(split, ray_local):
    plain = [r["key"] for r in iter_split(split)]
    one = [r["key"] for r in iter_split(split, shuffle=True, seed=1)]
    again = [r["key"] for r in iter_split(split, shuffle=True, seed=1)]
    two = [r["key"] for r in iter_split(split, shuffle=True, seed=2)]
    assert one == again and one != two and one != plain
    assert sorted(one) == sorted(two) == plain
    ds = read_split(split, shuffle=True, seed=7)
    epochs = [[row["key"] for row in ds.iter_rows()] for _ in range(2)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]) == plain


# ----------------------------------------------------------------------------- corruption


def _rewrite_member(shard_path: str, member_name: str, data: bytes) -> None:
    with tarfile.open(shard_path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(shard_path, "w") as archive:
        for member, content in members:
            if member.name == member_name:
                content = data
                member.size = len(data)
            archive.addfile(member, io.BytesIO(content))


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_KEY = shard_key("test", 60)  # the 11th sample of shard-000001.tar


def _corrupt(split: str, case: str) -> tuple[str, int]:
    """Damage shard-000001.tar; returns (key named in errors, samples expected lost)."""
    shard = os.path.join(split, "shard-000001.tar")
    member = f"{BAD_KEY}.png"
    if case == "undecodable":
        _rewrite_member(shard, member, b"\x89PNG\r\n\x1a\n but then garbage")
    elif case == "wrong_mode":
        _rewrite_member(shard, member, _png(np.zeros((28, 28, 3), np.uint8), "RGB"))
    elif case == "wrong_size":
        _rewrite_member(shard, member, _png(np.zeros((27, 28), np.uint8), "L"))
    elif case == "truncated":
        with open(shard, "r+b") as file:
            file.truncate(os.path.getsize(shard) // 2)
        return "", -1  # decided by where the cut falls; checked by totals
    elif case == "missing":
        os.remove(shard)
        return "*", 50
    return BAD_KEY, 1


CASES = ["undecodable", "wrong_mode", "wrong_size", "truncated", "missing"]
REASONS = {
    "undecodable": "cannot decode image",
    "wrong_mode": "image mode RGB, expected L",
    "wrong_size": "image size 27x28, expected 28x28",
    "truncated": "unreadable tar after",
    "missing": "shard missing",
}


@pytest.mark.parametrize("case", CASES)
def test_corruption_is_skipped_counted_and_logged(split, case, caplog):
    key, lost = _corrupt(split, case)
    tally = SkipTally()
    rows = list(iter_split(split, on_error="skip", tally=tally))
    assert len(rows) + tally.total() == 150
    assert tally.by_shard() == {"shard-000001.tar": tally.total()}
    if lost > 0:
        assert tally.total() == lost
    else:
        assert 0 < tally.total() < 50
    (record,) = tally.records()
    assert REASONS[case] in record.reason and record.shard == "shard-000001.tar"
    if key:
        assert record.key == key
    good = [r["key"] for r in rows]
    assert good[:50] == [shard_key("test", i) for i in range(50)]  # other shards are intact
    assert good[-50:] == [shard_key("test", i) for i in range(100, 150)]
    assert any("shard-000001.tar" in m and REASONS[case] in m for m in caplog.messages)
    assert "skipped" in tally.summary() and str(tally.total()) in tally.summary()


@pytest.mark.parametrize("case", CASES)
def test_corruption_fails_naming_shard_and_key(split, case):
    key, _ = _corrupt(split, case)
    with pytest.raises(CorruptDataError, match=r"shard shard-000001\.tar, key ") as info:
        list(iter_split(split, on_error="fail"))
    assert info.value.shard == "shard-000001.tar"
    assert REASONS[case] in info.value.reason
    if key:
        assert info.value.key == key


def test_ray_reader_reports_skips_to_a_shared_tally(split, ray_local):
    _corrupt(split, "undecodable")
    shard = os.path.join(split, "shard-000002.tar")
    with open(shard, "r+b") as file:
        file.truncate(os.path.getsize(shard) - 20_000)  # cut inside the last samples
    tally = SkipTally.shared()
    rows = _ray_rows(read_split(split, on_error="skip", tally=tally))
    by_shard = tally.by_shard()
    assert by_shard["shard-000001.tar"] == 1 and by_shard["shard-000002.tar"] > 0
    assert len(rows) + tally.total() == 150
    assert BAD_KEY not in {r["key"] for r in rows}
    assert {r.shard for r in tally.records()} == {"shard-000001.tar", "shard-000002.tar"}


def test_ray_reader_fails_naming_shard_and_key(split, ray_local):
    _corrupt(split, "wrong_size")
    # Ray raises RayTaskError(CorruptDataError): an instance of both, so callers catch ours.
    with pytest.raises(
        CorruptDataError, match=rf"shard shard-000001\.tar, key {BAD_KEY}: image size"
    ):
        _ray_rows(read_split(split, on_error="fail"))


def test_ray_reader_fails_early_on_a_missing_shard(split):
    _corrupt(split, "missing")
    with pytest.raises(CorruptDataError, match=r"shard shard-000001\.tar, key \*: shard missing"):
        read_split(split, on_error="fail")


def test_a_shard_the_manifest_does_not_list_is_an_error(split):
    fs, path = fsspec_filesystem(split)
    fs.copy(f"{path}/shard-000000.tar", f"{path}/shard-000003.tar")
    with pytest.raises(ManifestError, match="not in the manifest shard-000003.tar"):
        read_split(split)
    with pytest.raises(ManifestError, match="not in the manifest shard-000003.tar"):
        iter_split(split)


def test_skip_needs_a_tally_and_ray_needs_a_shared_one(split):
    with pytest.raises(ValueError, match="needs a tally"):
        iter_split(split, on_error="skip")
    with pytest.raises(ValueError, match=r"SkipTally.shared\(\)"):
        read_split(split, on_error="skip", tally=SkipTally())
