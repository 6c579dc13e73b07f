"""The fault proxy itself: each fault kind as boto3 and s3fs see it, determinism, caps, bounds."""

from __future__ import annotations

import socket

import botocore.config
import botocore.exceptions
import pytest

from pipeline.storage import StorageConfig, fsspec_filesystem, join_url
from tests.faults.s3_proxy import FAULT_KINDS, FaultPlan, FaultyS3Proxy

BODY = bytes(range(256)) * 400  # 100 KiB, so "half the body" is a real cut


def _client(endpoint: str, read_timeout: float = 5.0):
    import boto3

    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"},  # see each fault once
        read_timeout=read_timeout,
        connect_timeout=2,
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


@pytest.fixture
def obj(faulty_s3):
    faulty_s3.direct.client().put_object(Bucket=faulty_s3.direct.bucket, Key="a/obj.bin", Body=BODY)
    return faulty_s3


def _get(client, bucket: str) -> bytes:
    return client.get_object(Bucket=bucket, Key="a/obj.bin")["Body"].read()


@pytest.mark.parametrize(
    ("kind", "error", "text"),
    [
        ("500", botocore.exceptions.ClientError, "InternalError"),
        ("503", botocore.exceptions.ClientError, "SlowDown"),
        ("reset", botocore.exceptions.ConnectionClosedError, "closed before"),
        ("truncate", botocore.exceptions.BotoCoreError, ""),
        ("stall", botocore.exceptions.ReadTimeoutError, "Read timeout"),
    ],
)
def test_each_fault_kind_reaches_a_boto3_client_then_the_object_passes(obj, kind, error, text):
    obj.proxy.set_plan(FaultPlan(script={"obj.bin": (kind,)}, stall_s=30))
    client = _client(obj.bucket.endpoint_url, read_timeout=1.0)
    with pytest.raises(error) as info:
        _get(client, obj.bucket.bucket)
    assert text in str(info.value)
    if kind in ("500", "503"):
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(kind)
    if kind == "truncate":  # botocore checks the body against Content-Length
        assert (
            "IncompleteRead" in type(info.value).__name__
            or "ResponseStreaming" in type(info.value).__name__
        ), type(info.value)
    assert _get(client, obj.bucket.bucket) == BODY  # the script is spent: the next GET passes
    assert obj.proxy.counts[kind] == 1 and obj.proxy.counts["gets"] == 2


def test_s3fs_rides_out_faults_and_reads_every_byte(obj):
    # Two faults of each kind in a row (s3fs and botocore retry them), stalls cut after 1 s.
    kinds = tuple(k for k in FAULT_KINDS for _ in range(2))
    obj.proxy.set_plan(FaultPlan(script={"obj.bin": kinds}, stall_s=1))
    fs, path = fsspec_filesystem(
        join_url(obj.bucket.url, "a/obj.bin"),
        StorageConfig(endpoint_url=obj.bucket.endpoint_url, region="us-east-1", read_timeout=0.5),
    )
    assert fs.cat_file(path) == BODY
    assert {k: obj.proxy.counts[k] for k in FAULT_KINDS} == dict.fromkeys(FAULT_KINDS, 2)


def test_listings_heads_and_writes_are_never_faulted(faulty_s3):
    faulty_s3.proxy.set_plan(FaultPlan(rate=1.0))
    client = _client(faulty_s3.bucket.endpoint_url)
    bucket = faulty_s3.bucket.bucket
    client.put_object(Bucket=bucket, Key="x/one", Body=b"1")
    assert client.head_object(Bucket=bucket, Key="x/one")["ContentLength"] == 1
    listed = client.list_objects_v2(Bucket=bucket, Prefix="x/")["Contents"]
    assert [item["Key"] for item in listed] == ["x/one"]
    with pytest.raises((botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)):
        client.get_object(Bucket=bucket, Key="x/one")["Body"].read()
    assert faulty_s3.proxy.counts["gets"] == 1 and faulty_s3.proxy.faults == 1


def _fault_sequence(proxy: FaultyS3Proxy, endpoint: str, bucket: str, keys: list[str]) -> list:
    client = _client(endpoint, read_timeout=20)  # no stalls here: a slow answer is no fault
    seen = []
    for key in keys:
        try:
            client.get_object(Bucket=bucket, Key=key)["Body"].read()
            seen.append((key, None))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            seen.append((key, type(err).__name__))
    return seen


def test_same_seed_same_faults_and_the_cap_on_faults_in_a_row_holds(faulty_s3):
    client = faulty_s3.direct.client()
    keys = [f"k/{i}" for i in range(20)]
    for key in keys:
        client.put_object(Bucket=faulty_s3.direct.bucket, Key=key, Body=b"x" * 1000)
    plan = FaultPlan(seed=7, rate=0.5, kinds=("500", "503", "truncate"), max_in_a_row=2)
    gets = keys * 4  # each object four times
    runs = []
    for _ in range(2):
        faulty_s3.proxy.set_plan(plan)
        runs.append(
            _fault_sequence(
                faulty_s3.proxy, faulty_s3.bucket.endpoint_url, faulty_s3.bucket.bucket, gets
            )
        )
    assert runs[0] == runs[1]
    failed = sum(error is not None for _, error in runs[0])
    assert 0.25 * len(gets) < failed < 0.75 * len(gets)
    for key in keys:  # never three failures in a row for one object
        outcomes = [error is not None for k, error in runs[0] if k == key]
        assert not any(all(outcomes[i : i + 3]) for i in range(len(outcomes) - 2)), (key, outcomes)
    faulty_s3.proxy.set_plan(FaultPlan(seed=8, rate=0.5, kinds=plan.kinds, max_in_a_row=2))
    other = _fault_sequence(
        faulty_s3.proxy, faulty_s3.bucket.endpoint_url, faulty_s3.bucket.bucket, gets
    )
    assert other != runs[0]


def test_total_fault_cap_and_connection_bound(faulty_s3):
    client = faulty_s3.direct.client()
    client.put_object(Bucket=faulty_s3.direct.bucket, Key="c/one", Body=b"y")
    faulty_s3.proxy.set_plan(FaultPlan(rate=1.0, kinds=("500",), max_faults=3))
    seen = _fault_sequence(
        faulty_s3.proxy, faulty_s3.bucket.endpoint_url, faulty_s3.bucket.bucket, ["c/one"] * 5
    )
    assert [error is not None for _, error in seen] == [True, True, True, False, False]
    # At most max_connections at a time: one more is closed without an answer.
    with FaultyS3Proxy(faulty_s3.direct.endpoint_url, max_connections=1) as small:
        host, port = small.endpoint_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as first:
            first.sendall(b"HEAD /flowray-test/c/one HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.recv(9) == b"HTTP/1.1 "  # an answer (403: unsigned)
            with socket.create_connection((host, int(port)), timeout=5) as second:
                second.sendall(b"HEAD /flowray-test/c/one HTTP/1.1\r\nHost: x\r\n\r\n")
                assert second.recv(9) == b""


def test_the_proxy_refuses_a_non_loopback_upstream():
    with pytest.raises(ValueError, match="expected a loopback endpoint"):
        FaultyS3Proxy("http://example.com:9000")


def test_conditional_write_modes_as_boto3_sees_them(faulty_s3):
    """ "ignore" lets a second conditional create overwrite; "bare-412" refuses it with a 412
    whose body has no <Condition>; a scripted 409 is answered before the store sees the PUT."""
    client = faulty_s3.bucket.client(direct=False)
    put = {"Bucket": faulty_s3.bucket.bucket, "Key": "k", "IfNoneMatch": "*"}
    client.put_object(Body=b"one", **put)
    faulty_s3.proxy.set_plan(FaultPlan(conditional_writes="ignore"))
    client.put_object(Body=b"two", **put)
    read = faulty_s3.direct.client().get_object(Bucket=faulty_s3.bucket.bucket, Key="k")
    assert read["Body"].read() == b"two"
    faulty_s3.proxy.set_plan(FaultPlan(conditional_writes="bare-412", put_script={"k": ("409",)}))
    with pytest.raises(botocore.exceptions.ClientError) as conflict:
        client.put_object(Body=b"three", **put)
    assert conflict.value.response["Error"]["Code"] == "ConditionalRequestConflict"
    assert conflict.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Body=b"three", **put)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert "Condition" not in refused.value.response["Error"]
    with pytest.raises(ValueError, match="conditional_writes: expected one of"):
        FaultPlan(conditional_writes="sometimes")
    with pytest.raises(ValueError, match="put_script: expected some of"):
        FaultPlan(put_script={"k": ("500",)})
