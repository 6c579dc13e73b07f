"""A scoring job proves write-once on its output store before any work: a store that accepts a
second create of one object (If-None-Match ignored) stops it with exit 2, unless single-writer
mode is asked for; stores that answer 412 without <Condition>, or 409 once, pass."""

from __future__ import annotations

import logging

import pytest

from jobs.errors import exit_code_of
from pipeline.batch.scoring.config import ScoreConfig
from pipeline.batch.scoring.job import score
from pipeline.storage import WriteOnceUnsupported, join_url
from tests.faults.s3_proxy import FaultPlan


def _config(faulty_s3, **overrides) -> ScoreConfig:
    bucket = faulty_s3.bucket
    return ScoreConfig(
        model="models:/no-such-model@champion",
        input=join_url(bucket.url, "no-shards-here"),
        output=join_url(bucket.url, "scores"),
        storage=bucket.storage,
        log_to_mlflow=False,
        **overrides,
    )


def _keys(faulty_s3) -> list[str]:
    listed = faulty_s3.direct.client().list_objects_v2(Bucket=faulty_s3.direct.bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_a_store_that_ignores_if_none_match_stops_the_job_with_exit_2(faulty_s3):
    faulty_s3.proxy.set_plan(FaultPlan(conditional_writes="ignore"))
    with pytest.raises(WriteOnceUnsupported) as info:
        score(_config(faulty_s3))
    assert exit_code_of(info.value) == 2
    assert faulty_s3.bucket.endpoint_url in str(info.value)
    assert "--single-writer" in info.value.hint
    assert _keys(faulty_s3) == []  # the probe object is removed
    assert faulty_s3.proxy.counts["puts"] == 2  # the probe's two creates, and no other write


@pytest.mark.parametrize(
    "plan",
    [
        FaultPlan(conditional_writes="ignore"),  # refused, but the user vouches for one writer
        FaultPlan(conditional_writes="bare-412"),
        FaultPlan(put_script={"": ("409", "pass", "409")}),
    ],
    ids=["ignore+single-writer", "412-without-condition", "409-once-per-create"],
)
def test_the_job_goes_past_the_probe(faulty_s3, caplog, plan):
    """Past the probe, the job meets the next check (an input with no shards): not a storage
    error of its own."""
    faulty_s3.proxy.set_plan(plan)
    single_writer = plan.conditional_writes == "ignore"
    with caplog.at_level(logging.WARNING), pytest.raises(Exception) as info:
        score(_config(faulty_s3, single_writer=single_writer))
    assert "no-shards-here" in str(info.value), info.value
    assert not isinstance(info.value, WriteOnceUnsupported)
    warned = [r for r in caplog.records if "single-writer" in r.getMessage()]
    assert len(warned) == (1 if single_writer else 0)
    assert _keys(faulty_s3) == []
    assert faulty_s3.proxy.counts["409"] == (2 if plan.put_script else 0)
