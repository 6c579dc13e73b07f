"""Reading shards from S3 through the fault proxy: storage faults are retried and never counted
as bad data; storage that keeps failing leaves a shard out as transient; at a 5% fault rate a
split of thousands of images reads back exactly once, pixel for pixel."""

from __future__ import annotations

import hashlib

import pytest

from pipeline.data.reader import iter_input, read_input
from pipeline.data.shards import prepare, shard_key
from pipeline.data.sources import open_source
from pipeline.data.streams import RetryPolicy, TransientReadError
from pipeline.data.tally import CorruptDataError, SkipTally
from pipeline.storage import StorageConfig, StorageError, join_url
from tests.faults.s3_proxy import FAULT_KINDS, FaultPlan

# Short waits: the test is about what is retried, not how long a real backoff waits.
FAST = RetryPolicy(attempts=6, base_delay_s=0.01, max_delay_s=0.05)
BAD_SHARD = "shard-000001.tar"
SHAPE = (1, 28, 28)


@pytest.fixture
def fmnist(fashion_mnist_dir):
    return open_source(f"idx:{fashion_mnist_dir}")


def _through(faulty_s3, read_timeout: float = 5.0) -> StorageConfig:
    return StorageConfig(
        endpoint_url=faulty_s3.bucket.endpoint_url, region="us-east-1", read_timeout=read_timeout
    )


def _digest(row: dict) -> tuple[int, str]:
    return int(row["label"]), hashlib.sha256(row["image"].tobytes()).hexdigest()


@pytest.fixture
def s3_split(fmnist, faulty_s3) -> tuple[str, dict[str, tuple[int, str]]]:
    """150 test images in 3 shards on S3 (written around the proxy) and their rows, read
    around the proxy: {key: (label, sha256 of pixels)}."""
    out = join_url(faulty_s3.direct.url, "fmnist")
    prepare(fmnist, out, faulty_s3.direct.storage, splits=["test"], limit=150, shard_samples=50)
    split = join_url(out, "test")
    rows = iter_input(split, faulty_s3.direct.storage, shape=SHAPE)
    return split, {r["key"]: _digest(r) for r in rows}


# How many faults in a row get past s3fs and botocore (3 attempts, s3fs 5 more for some kinds),
# so that only the reader's own retries can save the read. Stalls cost a read timeout each.
BURSTS = {"500": 8, "503": 20, "reset": 20, "truncate": 8, "stall": 7}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_a_burst_of_faults_longer_than_s3fs_retries_is_ridden_out(s3_split, faulty_s3, kind):
    """A burst that gets past s3fs must not surface as an OSError or aiohttp error, counted as an
    unreadable tar with the shard coming back short."""
    split, expected = s3_split
    faulty_s3.proxy.set_plan(FaultPlan(script={BAD_SHARD: (kind,) * BURSTS[kind]}, stall_s=5))
    tally = SkipTally()
    storage = _through(faulty_s3, read_timeout=0.5)
    rows = list(iter_input(split, storage, shape=SHAPE, on_error="skip", tally=tally, retry=FAST))
    assert faulty_s3.proxy.counts[kind] == BURSTS[kind]  # every scripted fault was served
    assert {r["key"]: _digest(r) for r in rows} == expected
    assert [r["key"] for r in rows] == [shard_key("test", i) for i in range(150)]
    outcome = tally.outcomes()[join_url(split, BAD_SHARD)]
    assert outcome.complete and outcome.rows == 50 and outcome.retries >= 1
    assert tally.total() == 0 and tally.records() == []


def test_storage_that_keeps_failing_is_transient_never_bad_data(s3_split, faulty_s3, caplog):
    split, expected = s3_split
    faulty_s3.proxy.set_plan(FaultPlan(script={BAD_SHARD: ("500",) * 1000}))
    retry = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02)
    storage = _through(faulty_s3)
    tally = SkipTally()
    rows = list(iter_input(split, storage, shape=SHAPE, on_error="skip", tally=tally, retry=retry))
    assert {r["key"] for r in rows} == {k for k in expected if not 50 <= int(k[-8:]) < 100}
    (outcome,) = [o for o in tally.outcomes().values() if not o.complete]
    assert (outcome.shard, outcome.transient, outcome.rows, outcome.skipped_keys) == (
        join_url(split, BAD_SHARD),
        True,
        0,
        (),
    )
    assert "storage kept failing" in outcome.reason and "after 3 attempts" in outcome.reason
    # Under "fail" it is a storage error (rerun later), never CorruptDataError (bad data).
    with pytest.raises(TransientReadError, match="storage kept failing") as info:
        list(iter_input(split, storage, shape=SHAPE, on_error="fail", retry=retry))
    assert isinstance(info.value, StorageError) and not isinstance(info.value, CorruptDataError)
    assert "rerun" in info.value.hint


@pytest.mark.parametrize(
    ("rate", "cap"),
    [(0.05, None), pytest.param(0.3, None, marks=pytest.mark.slow)],
)
def test_chaos_read_of_thousands_of_images_gives_each_exactly_once(
    fmnist, faulty_s3, ray_local, rate, cap
):
    """3,000 images in 60 shards read by Ray Data through every fault kind at `rate` of object
    GETs: exactly the 3,000 rows of a fault-free read, pixel for pixel, and no shard left out."""
    out = join_url(faulty_s3.direct.url, "chaos")
    prepare(fmnist, out, faulty_s3.direct.storage, splits=["train"], limit=3000, shard_samples=50)
    split = join_url(out, "train")
    rows = iter_input(split, faulty_s3.direct.storage, shape=SHAPE)
    expected = {r["key"]: _digest(r) for r in rows}
    assert len(expected) == 3000

    faulty_s3.proxy.set_plan(FaultPlan(seed=12, rate=rate, max_in_a_row=cap, stall_s=3))
    tally = SkipTally.shared()
    storage = _through(faulty_s3, read_timeout=1.0)
    dataset = read_input(split, storage, shape=SHAPE, on_error="skip", tally=tally, retry=FAST)
    got: dict[str, tuple[int, str]] = {}
    duplicates = 0
    for batch in dataset.iter_batches(batch_size=500, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            duplicates += key in got
            got[key] = _digest({"label": batch["label"][i], "image": batch["image"][i]})
    counts = dict(faulty_s3.proxy.counts)
    print(f"chaos read at rate {rate}: proxy {counts}")  # the measurement, shown with -s
    assert duplicates == 0 and got == expected
    outcomes = tally.outcomes()
    assert len(outcomes) == 60 and all(o.complete for o in outcomes.values())
    assert tally.total() == 0
    assert faulty_s3.proxy.faults > 0, counts
