"""Foreign shards, the cases around the common one: which member is the image, labels, samples
without an image or with a repeated key, truncated tars, shards rewritten after the listing,
limits, missing pattern shards, storage faults (retried, never bad data) and shuffling."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageLimits, decode_fitted
from pipeline.data.inputs import resolve_input
from pipeline.data.reader import iter_input, read_input
from pipeline.data.streams import RetryPolicy, TransientReadError
from pipeline.data.tally import CorruptDataError, SkipTally
from pipeline.storage import StorageConfig, join_url
from tests.faults.s3_proxy import FaultPlan
from tests.pipeline.data.foreign_shards import make_photos, upload, write_shards

SHAPE = (1, 16, 16)
FAST = RetryPolicy(attempts=6, base_delay_s=0.01, max_delay_s=0.05)


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar written member by member, in the order given (as a hand-rolled tool would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _png(value: int, size: tuple[int, int] = (20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_image_member_follows_the_preferred_order_and_cls_gives_the_label(tmp_path):
    jpeg = make_photos(1)[0].jpeg
    shard = _write_tar(
        tmp_path / "mixed.tar",
        [
            ("a/both", {"cls": b"4", "jpg": jpeg, "json": b"{}", "png": _png(200)}),
            ("a/webp_only", {"webp": _webp(), "txt": b"caption"}),
            ("a/seg", {"seg.png": _png(9), "jpeg": jpeg}),
        ],
    )
    default = list(iter_input(str(shard), shape=SHAPE))
    assert [r["key"] for r in default] == ["a/both", "a/webp_only", "a/seg"]
    assert [r["label"] for r in default] == [4, -1, -1]
    np.testing.assert_array_equal(default[0]["image"], decode_fitted(jpeg, 1, (16, 16)).pixels)
    assert default[1]["orig_width"] == 12 and default[1]["orig_height"] == 6
    # "seg.png" is another member (a mask), not the image: jpeg is.
    np.testing.assert_array_equal(default[2]["image"], default[0]["image"])
    tally = SkipTally()
    png_first = list(
        iter_input(
            str(shard), shape=SHAPE, image_members=("png", "jpeg"), on_error="skip", tally=tally
        )
    )
    assert [r["key"] for r in png_first] == ["a/both", "a/seg"]
    assert [r.key for r in tally.records()] == ["a/webp_only"]
    assert int(png_first[0]["image"].min()) == 200 == int(png_first[0]["image"].max())


def _webp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 6), (10, 200, 30)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def test_samples_without_an_image_a_bad_cls_or_a_repeated_key_are_bad_samples(tmp_path):
    shard = _write_tar(
        tmp_path / "odd.tar",
        [
            ("k1", {"png": _png(1)}),
            ("k2", {"json": b"{}", "txt": b"no image"}),
            ("k3", {"png": _png(3), "cls": b"three"}),
            ("k4", {"png": _png(4)}),
            ("k1", {"png": _png(5)}),  # k1 again: its members were not adjacent
        ],
    )
    tally = SkipTally()
    rows = list(iter_input(str(shard), shape=SHAPE, on_error="skip", tally=tally))
    assert [r["key"] for r in rows] == ["k1", "k4"]
    reasons = {r.key: r.reason for r in tally.records()}
    assert set(reasons) == {"k2", "k3", "k1"}
    assert "no image member" in reasons["k2"] and "json, txt" in reasons["k2"]
    assert "bad cls" in reasons["k3"] and "met twice" in reasons["k1"]
    outcome = tally.outcomes()[str(shard)]
    assert outcome.complete and (outcome.expected, outcome.rows) == (5, 2)


def _header_offset(path: Path, member: int) -> int:
    with tarfile.open(path) as archive:
        return archive.getmembers()[member].offset


@pytest.mark.parametrize("cut", ["inside a member", "at a header", "garbage header"])
def test_a_truncated_tar_leaves_its_shard_out_and_holds_back_its_last_row(tmp_path, cut):
    """Python's tarfile ends quietly at a missing or bad header, as at the end of the archive:
    the reader tells them apart, or a cut shard would pass for a whole one."""
    photos = make_photos(6)
    (path,) = write_shards(tmp_path / "photos", photos, per_shard=6)
    data = path.read_bytes()
    if cut == "inside a member":
        path.write_bytes(data[: int(len(data) * 0.7)])
    elif cut == "at a header":
        path.write_bytes(data[: _header_offset(path, 9)])  # sample 3 of 6, its 2nd member
    else:
        at = _header_offset(path, 9)
        path.write_bytes(data[:at] + b"\x7f" * 512 + data[at + 512 :])
    tally = SkipTally()
    rows = list(iter_input(str(path), shape=SHAPE, on_error="skip", tally=tally))
    outcome = tally.outcomes()[str(path)]
    assert not outcome.complete and "unreadable tar" in outcome.reason
    assert outcome.rows == len(rows) and len(rows) < 6
    assert all(r["shard_rows"] == -1 for r in rows)  # no end marker: the shard is not whole
    with pytest.raises(CorruptDataError, match="unreadable tar"):
        list(iter_input(str(path), shape=SHAPE))


def test_a_shard_rewritten_after_the_listing_is_left_out_for_a_rerun(tmp_path):
    paths = write_shards(tmp_path / "photos", make_photos(6), per_shard=3)
    plan = resolve_input(str(tmp_path / "photos"))
    paths[1].write_bytes(paths[0].read_bytes() + b"\0" * 1024)
    tally = SkipTally()
    rows = list(iter_input(plan, shape=SHAPE, on_error="skip", tally=tally))
    assert [r["shard"] for r in rows] == [str(paths[0])] * 3
    outcome = tally.outcomes()[str(paths[1])]
    assert outcome.transient and not outcome.complete
    assert "changed after it was listed" in outcome.reason
    with pytest.raises(TransientReadError, match="changed after it was listed"):
        list(iter_input(plan, shape=SHAPE))


def test_limits_refuse_members_before_decoding(tmp_path):
    photos = make_photos(5)  # the fifth is 280x220
    (path,) = write_shards(tmp_path / "photos", photos, per_shard=5)
    tally = SkipTally()
    limits = ImageLimits(max_pixels=200 * 200, max_bytes=max(len(p.jpeg) for p in photos[:4]))
    rows = list(iter_input(str(path), shape=SHAPE, on_error="skip", tally=tally, limits=limits))
    assert [r["key"] for r in rows] == [p.key for p in photos[:4]]
    (record,) = tally.records()
    assert record.key == photos[4].key
    assert "max_bytes" in record.reason or "max_pixels" in record.reason


def test_missing_pattern_shards_are_left_out_under_skip_and_raise_under_fail(tmp_path):
    write_shards(tmp_path / "photos", make_photos(4), per_shard=2)
    spec = str(tmp_path / "photos" / "{000000..000002}.tar")
    tally = SkipTally()
    rows = list(iter_input(spec, shape=SHAPE, on_error="skip", tally=tally))
    assert len(rows) == 4
    missing = str(tmp_path / "photos" / "000002.tar")
    assert [o.shard for o in tally.outcomes().values() if not o.complete] == [missing]
    with pytest.raises(CorruptDataError) as failed:
        list(iter_input(spec, shape=SHAPE))
    assert failed.value.shard == missing


def test_storage_faults_on_foreign_shards_are_retried_never_bad_data(tmp_path, faulty_s3):
    photos = make_photos(12)
    paths = write_shards(tmp_path / "photos", photos, per_shard=4)
    prefix = join_url(faulty_s3.direct.url, "photos")
    upload(paths, prefix, faulty_s3.direct.storage)
    script = {"000001.tar": ("500", "truncate", "reset", "503", "truncate", "500", "503", "500")}
    faulty_s3.proxy.set_plan(FaultPlan(script=script))
    storage = StorageConfig(endpoint_url=faulty_s3.bucket.endpoint_url, region="us-east-1")
    tally = SkipTally()
    rows = list(iter_input(prefix, storage, shape=SHAPE, on_error="skip", tally=tally, retry=FAST))
    assert [r["key"] for r in rows] == [p.key for p in photos]
    outcome = tally.outcomes()[join_url(prefix, "000001.tar")]
    assert outcome.complete and outcome.retries >= 1 and tally.records() == []
    assert sum(faulty_s3.proxy.counts[k] for k in ("500", "503", "reset", "truncate")) == 8


def test_shuffled_reads_give_the_same_rows_in_another_order(tmp_path, ray_local):
    photos = make_photos(20)
    write_shards(tmp_path / "photos", photos, per_shard=5)
    spec = str(tmp_path / "photos")
    plain = [r["key"] for r in iter_input(spec, shape=SHAPE)]
    shuffled = [r["key"] for r in iter_input(spec, shape=SHAPE, shuffle=True, seed=3)]
    assert sorted(shuffled) == plain and shuffled != plain
    dataset = read_input(spec, shape=SHAPE, shuffle=True, seed=3)
    first = [k for b in dataset.iter_batches(batch_size=None) for k in b["key"]]
    second = [k for b in dataset.iter_batches(batch_size=None) for k in b["key"]]
    assert sorted(first) == sorted(second) == plain
