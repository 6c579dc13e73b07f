"""Reading prepared splits: Ray Data and the plain iterator give the source's keys, pixels and
labels back, from local disk and S3; shard subsets; shuffling; every corruption case of a shard
checked against its manifest entry, under skip and fail."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageLimits, encode_png, fit_image
from pipeline.data.reader import iter_input, read_input
from pipeline.data.shards import ManifestError, prepare, shard_key
from pipeline.data.sources import FolderSource, open_source
from pipeline.data.tally import CorruptDataError, ShardOutcome, SkipTally
from pipeline.storage import fsspec_filesystem, join_url, put_file_atomic

SHAPE = (1, 28, 28)


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
    rows = _ray_rows(read_input(split, storage, shape=SHAPE))
    expected = list(fmnist.read("train", range(300)))
    assert [r["key"] for r in rows] == [shard_key("train", i) for i in range(300)]
    for i, (row, source) in enumerate(zip(rows, expected)):
        assert row["shard"] == join_url(split, f"shard-00000{i // 100}.tar")
        assert row["label"] == source.label
        assert row["image"].shape == (1, 28, 28)
        np.testing.assert_array_equal(row["image"], source.image)
    assert all(row["nbytes"] == len(encode_png(row["image"])) for row in rows[:5])
    # The plain iterator goes through the same decode path: identical rows, in shard order.
    _assert_same_rows(list(iter_input(split, storage, shape=SHAPE)), rows)


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
    rows = _ray_rows(read_input(join_url(out, "train"), storage, shape=(3, 32, 32)))
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
    shards = [_url(split, "shard-000002.tar"), _url(split, "shard-000000.tar")]
    rows = list(iter_input(split, shape=SHAPE, shards=shards))
    keys = [r["key"] for r in rows]
    assert keys == [shard_key("test", i) for i in [*range(100, 150), *range(50)]]
    with pytest.raises(ValueError, match="no shard '.*shard-000007.tar'"):
        iter_input(split, shape=SHAPE, shards=[_url(split, "shard-000007.tar")])


def test_shuffle_changes_order_not_content(split, ray_local):
    plain = [r["key"] for r in iter_input(split, shape=SHAPE)]
    one = [r["key"] for r in iter_input(split, shape=SHAPE, shuffle=True, seed=1)]
    again = [r["key"] for r in iter_input(split, shape=SHAPE, shuffle=True, seed=1)]
    two = [r["key"] for r in iter_input(split, shape=SHAPE, shuffle=True, seed=2)]
    assert one == again and one != two and one != plain
    assert sorted(one) == sorted(two) == plain
    ds = read_input(split, shape=SHAPE, shuffle=True, seed=7)
    epochs = [[row["key"] for row in ds.iter_rows()] for _ in range(2)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]) == plain


# ----------------------------------------------------------------------------- corruption
#
# Two families. Bad images: the shard is whole and matches its manifest (`_reseal` gives it the
# manifest entry another tool would have written), but one member is not a usable image: that
# sample alone is skipped, and the shard is complete. Bad shards: the shard is missing, cut,
# altered, or holds more samples than its manifest lists: it is reported and left out whole.

BAD_KEY = shard_key("test", 60)  # the 11th sample of shard-000001.tar
BAD_SHARD = "shard-000001.tar"


def _lost(tally: SkipTally) -> dict[str, int]:
    """{shard: samples not handed on}, for the shards that lost any."""
    return {shard: o.lost for shard, o in tally.outcomes().items() if o.lost}


def _left_out(tally: SkipTally) -> list[ShardOutcome]:
    """The shards that could not be read whole."""
    return [o for o in tally.outcomes().values() if not o.complete]


def _url(split: str, name: str = BAD_SHARD) -> str:
    return join_url(split, name)


def _rewrite_member(shard_path: str, member_name: str, data: bytes | None, extra=()) -> None:
    """Rewrite a shard with `member_name` replaced by `data` (None: dropped) and `extra`
    (name, bytes) members appended."""
    with tarfile.open(shard_path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(shard_path, "w") as archive:
        for member, content in members:
            if member.name == member_name:
                if data is None:
                    continue
                content = data
                member.size = len(data)
            archive.addfile(member, io.BytesIO(content))
        for name, content in extra:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


def _reseal(split: str, shard: str) -> None:
    """Give `shard` the size and sha256 its bytes have now in the manifest."""
    import hashlib
    import json

    path = Path(split) / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (Path(split) / shard).read_bytes()
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(manifest))


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 15000) -> bytes:
    """A real side x side greyscale PNG of a few hundred KB (all zeros compress ~1000:1)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    raw = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + zeros
    data = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


BAD_IMAGES = {
    "undecodable": (b"\x89PNG\r\n\x1a\n but then garbage", "cannot decode image"),
    "wrong_mode": (
        lambda: _png(np.zeros((28, 28, 3), np.uint8), "RGB"),
        "image mode RGB, expected L",
    ),
    "wrong_size": (
        lambda: _png(np.zeros((27, 28), np.uint8), "L"),
        "image size 27x28, expected 28x28",
    ),
    "bomb": (_bomb_png, "225,000,000 pixels is larger than Pillow's limit"),
    "oversized": (bytes(400_000), "larger than the limit of 300,000 bytes"),
    "no_png": (None, "no image member: expected one of jpg, jpeg, png, webp, found cls"),
}
LIMITS = ImageLimits(max_bytes=300_000)  # above the bomb PNG (219 KB), below "oversized"


def _bad_image(split: str, case: str) -> str:
    data, reason = BAD_IMAGES[case]
    data = data() if callable(data) else data
    _rewrite_member(os.path.join(split, BAD_SHARD), f"{BAD_KEY}.png", data)
    _reseal(split, BAD_SHARD)
    return reason


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_skips_that_sample_and_the_shard_stays_complete(split, case, caplog):
    reason = _bad_image(split, case)
    tally = SkipTally()
    rows = list(iter_input(split, shape=SHAPE, on_error="skip", tally=tally, limits=LIMITS))
    keys = [r["key"] for r in rows]
    assert keys == [shard_key("test", i) for i in range(150) if i != 60]
    outcome = tally.outcomes()[_url(split)]
    assert outcome.complete and outcome.reason == ""
    assert (outcome.expected, outcome.rows, outcome.skipped_keys) == (50, 49, (BAD_KEY,))
    assert all(tally.outcomes()[_url(split, f"shard-00000{i}.tar")].complete for i in (0, 2))
    assert tally.total() == 1 and _lost(tally) == {_url(split): 1} and _left_out(tally) == []
    (record,) = tally.records()
    assert (record.shard, record.key, record.count) == (_url(split), BAD_KEY, 1)
    assert reason in record.reason
    assert any(_url(split) in m and BAD_KEY in m and reason in m for m in caplog.messages)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_fails_naming_shard_and_key(split, case):
    reason = _bad_image(split, case)
    with pytest.raises(
        CorruptDataError, match=rf"shard {re.escape(_url(split))}, key {BAD_KEY}: "
    ) as info:
        list(iter_input(split, shape=SHAPE, on_error="fail", limits=LIMITS))
    assert reason in info.value.reason


def _bad_shard(split: str, case: str) -> tuple[str, str]:
    """Damage shard-000001.tar; returns (key named in the error, reason)."""
    shard = os.path.join(split, BAD_SHARD)
    size = os.path.getsize(shard)
    if case == "missing":
        os.remove(shard)
        return "*", "shard missing"
    if case == "cut":  # an interrupted copy: the manifest still says the full size
        with open(shard, "r+b") as file:
            file.truncate(size - 20_000)
        return "*", f"bytes, manifest says {size:,}"
    if case == "cut_resealed":  # the manifest agrees with the cut file: the tar itself ends early
        with open(shard, "r+b") as file:
            file.truncate(size // 2 + 100)
        _reseal(split, BAD_SHARD)
        return "", "unreadable tar after"
    if case == "altered":  # same size, one byte of tar padding changed: only the hash knows
        with open(shard, "r+b") as file:
            file.seek(size - 10)
            file.write(b"\x01")
        return "*", "differs from the manifest's"
    if case == "more_samples":
        extra = shard_key("test", 999)
        _rewrite_member(
            shard,
            "",
            None,
            extra=[
                (f"{extra}.png", _png(np.zeros((28, 28), np.uint8), "L")),
                (f"{extra}.cls", b"3"),
            ],
        )
        _reseal(split, BAD_SHARD)
        return extra, "holds more samples than the 50 its manifest lists"
    raise AssertionError(case)


BAD_SHARDS = ["missing", "cut", "cut_resealed", "altered", "more_samples"]


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_a_bad_shard_is_left_out_whole_and_every_other_shard_read(split, case, caplog):
    key, reason = _bad_shard(split, case)
    tally = SkipTally()
    rows = list(iter_input(split, shape=SHAPE, on_error="skip", tally=tally))
    bad = _url(split)
    others = [r["key"] for r in rows if r["shard"] != bad]
    assert others == [shard_key("test", i) for i in [*range(50), *range(100, 150)]]
    # Never the whole shard: its last row is held back until the shard is known to be whole.
    handed = sum(r["shard"] == bad for r in rows)
    assert handed < 50
    (outcome,) = _left_out(tally)
    assert (outcome.shard, outcome.complete, outcome.transient) == (bad, False, False)
    assert reason in outcome.reason and outcome.rows == handed and outcome.lost == 50 - handed
    assert tally.total() == 50 - handed and _lost(tally) == {bad: 50 - handed}
    assert any(f"left out shard {bad}" in m and reason in m for m in caplog.messages)
    if key:
        assert tally.records()[-1].key == key


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_a_bad_shard_fails_naming_the_shard(split, case):
    key, reason = _bad_shard(split, case)
    with pytest.raises(CorruptDataError, match=rf"shard {re.escape(_url(split))}, key ") as info:
        list(iter_input(split, shape=SHAPE, on_error="fail"))
    assert info.value.shard == _url(split) and reason in info.value.reason
    if key:
        assert info.value.key == key


def test_under_fail_a_missing_or_cut_shard_stops_before_any_work(split):
    _bad_shard(split, "cut")
    with pytest.raises(CorruptDataError, match=r"shard-000001\.tar, key \*: shard has"):
        iter_input(split, shape=SHAPE, on_error="fail")  # raised when made, not while reading


def test_skip_reads_the_good_shards_when_the_manifest_disagrees_with_the_files(split, caplog):
    """One shard lost its last 20 KB (and a stray file sits next to them): the others are read."""
    _bad_shard(split, "cut")
    fs, path = fsspec_filesystem(split)
    fs.copy(f"{path}/shard-000000.tar", f"{path}/shard-000003.tar")
    tally = SkipTally()
    rows = list(iter_input(split, shape=SHAPE, on_error="skip", tally=tally))
    assert [r["key"] for r in rows] == [
        shard_key("test", i) for i in [*range(50), *range(100, 150)]
    ]
    (outcome,) = _left_out(tally)
    assert outcome.shard == _url(split) and outcome.rows == 0 and "manifest says" in outcome.reason
    assert any("shard-000003.tar" in m and "ignored" in m for m in caplog.messages)
    with pytest.raises(ManifestError, match="not in the manifest shard-000003.tar"):
        iter_input(split, shape=SHAPE, on_error="fail")


def test_ray_reader_reports_outcomes_to_a_shared_tally(split, ray_local):
    _bad_image(split, "undecodable")
    shard = os.path.join(split, "shard-000002.tar")
    with open(shard, "r+b") as file:
        file.truncate(os.path.getsize(shard) - 20_000)  # cut inside the last samples
    tally = SkipTally.shared()
    rows = _ray_rows(read_input(split, shape=SHAPE, on_error="skip", tally=tally))
    assert [r["key"] for r in rows] == [shard_key("test", i) for i in range(100) if i != 60]
    outcomes = tally.outcomes()
    first, bad, last = (_url(split, f"shard-00000{i}.tar") for i in range(3))
    assert outcomes[first].complete and outcomes[first].rows == 50
    assert outcomes[bad].complete and outcomes[bad].skipped_keys == (BAD_KEY,)
    assert not outcomes[last].complete and outcomes[last].rows == 0
    assert _lost(tally) == {bad: 1, last: 50}


def test_a_local_tally_cannot_be_sent_to_another_process():
    # A copy would count in the other process and report nothing to this one.
    with pytest.raises(TypeError, match="use SkipTally.shared"):
        pickle.dumps(SkipTally())


def test_ray_reader_fails_naming_shard_and_key(split, ray_local):
    _bad_image(split, "wrong_size")
    # Ray raises RayTaskError(CorruptDataError): an instance of both, so callers catch ours.
    with pytest.raises(
        CorruptDataError, match=rf"shard-000001\.tar, key {BAD_KEY}: png: image size"
    ):
        _ray_rows(read_input(split, shape=SHAPE, on_error="fail"))


def test_ray_reader_fails_early_on_a_missing_shard(split):
    _bad_shard(split, "missing")
    with pytest.raises(CorruptDataError, match=r"shard-000001\.tar, key \*: shard missing"):
        read_input(split, shape=SHAPE, on_error="fail")


def test_a_shard_the_manifest_does_not_list_is_an_error_under_fail(split):
    fs, path = fsspec_filesystem(split)
    fs.copy(f"{path}/shard-000000.tar", f"{path}/shard-000003.tar")
    with pytest.raises(ManifestError, match="not in the manifest shard-000003.tar"):
        read_input(split, shape=SHAPE)
    with pytest.raises(ManifestError, match="not in the manifest shard-000003.tar"):
        iter_input(split, shape=SHAPE)


def test_temp_files_are_never_taken_for_shards(split):
    """What a prepare killed mid-shard leaves (the old name ended in .tar) is not a shard."""
    for name in (
        ".shard-000001.tar.tmp-4194301-0a1b2c3d.tar",
        ".shard-000001.tar.0a1b2c-77-0a1b2c3d.tmp",
    ):
        with open(os.path.join(split, name), "wb") as file:
            file.write(b"half a shard")
    assert len(list(iter_input(split, shape=SHAPE, on_error="fail"))) == 150


def test_skip_needs_a_tally_and_ray_needs_a_shared_one(split):
    with pytest.raises(ValueError, match="needs a tally"):
        iter_input(split, shape=SHAPE, on_error="skip")
    with pytest.raises(ValueError, match=r"SkipTally.shared\(\)"):
        read_input(split, shape=SHAPE, on_error="skip", tally=SkipTally())
