"""Storage URLs: local and S3 (moto on loopback) through fsspec and pyarrow, atomic writes, errors."""

from __future__ import annotations

import os
import socket

import pytest
import s3fs

from flowmodel.typed import ConfigError, from_dict, to_dict
from pipeline.storage import (
    StorageConfig,
    StorageError,
    arrow_filesystem,
    check_access,
    exists,
    fsspec_filesystem,
    join_url,
    list_files,
    put_file_atomic,
    read_bytes,
    write_bytes_atomic,
    write_once,
)


def test_config_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert StorageConfig().endpoint_url == "http://127.0.0.1:9000"
    assert StorageConfig().region == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert StorageConfig().region == "eu-north-1"
    explicit = StorageConfig(endpoint_url="https://minio.example:9000", region="us-west-2")
    assert (explicit.endpoint_url, explicit.region) == ("https://minio.example:9000", "us-west-2")


def test_config_without_environment_means_aws(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert StorageConfig().endpoint_url is None
    assert StorageConfig().region == "us-east-1"


def test_config_parses_with_typed_from_dict_and_round_trips():
    config = from_dict(StorageConfig, {"endpoint_url": "http://localhost:5000", "region": "x-1"})
    assert config == from_dict(StorageConfig, to_dict(config))
    with pytest.raises(ConfigError, match="unknown key secret_access_key"):
        from_dict(StorageConfig, {"secret_access_key": "nope"})
    with pytest.raises(ConfigError, match="endpoint_url"):
        from_dict(StorageConfig, {"endpoint_url": "localhost:5000"})


def test_credentials_never_appear_in_repr_or_errors(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    config = StorageConfig(endpoint_url="http://127.0.0.1:1")
    assert "sekrit" not in repr(config) + config.describe() + str(to_dict(config))
    error = StorageError("failed with key sekrit-value-123", hint="sekrit-value-123 again")
    assert "sekrit" not in str(error) + error.hint


def test_local_paths_and_file_urls_map_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = fsspec_filesystem("data/train")
    assert path == str(tmp_path / "data" / "train")
    assert fs.protocol[0] in ("file", "local")
    _, path = fsspec_filesystem(f"file://{tmp_path}/x")
    assert path == f"{tmp_path}/x"
    afs, path = arrow_filesystem(f"file://{tmp_path}/x")
    assert type(afs).__name__ == "LocalFileSystem" and path == f"{tmp_path}/x"


def test_unsupported_scheme_is_a_storage_error():
    with pytest.raises(StorageError, match=r"gs://"):
        fsspec_filesystem("gs://bucket/x")


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        (
            "s3://bucket/prefix",
            ("train", "shard-000000.tar"),
            "s3://bucket/prefix/train/shard-000000.tar",
        ),
        ("s3://bucket/prefix/", ("/train/",), "s3://bucket/prefix/train"),
        ("/data", ("a", "", "b"), "/data/a/b"),
        ("file:///data", ("x",), "file:///data/x"),
    ],
)
def test_join_url(base, parts, expected):
    assert join_url(base, *parts) == expected


def test_local_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "sub" / "blob.json")
    write_bytes_atomic(url, b"one")
    write_bytes_atomic(url, b"two")
    assert read_bytes(url) == b"two"
    assert sorted(os.listdir(tmp_path / "sub")) == ["blob.json"]
    assert exists(url) and not exists(url + ".missing")
    source = tmp_path / "local.bin"
    source.write_bytes(b"payload")
    put_file_atomic(str(source), str(tmp_path / "sub" / "copy.bin"))
    assert list_files(str(tmp_path / "sub")) == {"blob.json": 3, "copy.bin": 7}
    assert list_files(str(tmp_path / "nothing-here")) == {}


def test_write_once_creates_a_file_once_locally_and_on_s3(tmp_path, s3):
    local = (str(tmp_path / "new" / "x.json"), StorageConfig())
    for url, storage in (local, (join_url(s3.url, "p", "x.json"), s3.storage)):
        assert write_once(url, b"first", storage) is True
        assert write_once(url, b"second", storage) is False
        assert read_bytes(url, storage) == b"first"
    assert os.listdir(tmp_path / "new") == ["x.json"]  # no temp left behind


def test_write_once_without_hard_links_creates_exclusively(tmp_path, monkeypatch):
    """A filesystem without hard links (link(2) answers EPERM): the file is created with O_EXCL,
    still once, and no temp stays behind."""
    import errno

    def no_link(source, destination) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    url = str(tmp_path / "x.json")
    assert write_once(url, b"first") is True
    assert write_once(url, b"second") is False
    assert read_bytes(url) == b"first"
    assert os.listdir(tmp_path) == ["x.json"]


def test_write_once_passes_on_other_link_errors(tmp_path, monkeypatch):
    import errno

    def full_disk(source, destination) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full_disk)
    with pytest.raises(OSError) as info:
        write_once(str(tmp_path / "x.json"), b"first")
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_s3_through_fsspec_and_pyarrow_share_one_endpoint(s3, tmp_path):
    url = join_url(s3.url, "prefix", "blob.bin")
    write_bytes_atomic(url, b"0123456789", s3.storage)
    fs, path = fsspec_filesystem(url, s3.storage)
    assert isinstance(fs, s3fs.S3FileSystem) and path == f"{s3.bucket}/prefix/blob.bin"
    assert read_bytes(url, s3.storage) == b"0123456789"
    afs, apath = arrow_filesystem(url, s3.storage)
    with afs.open_input_stream(apath) as stream:
        assert stream.read() == b"0123456789"
    local = tmp_path / "up.bin"
    local.write_bytes(b"x" * 1000)
    put_file_atomic(str(local), join_url(s3.url, "prefix", "up.bin"), s3.storage)
    assert list_files(join_url(s3.url, "prefix"), s3.storage) == {"blob.bin": 10, "up.bin": 1000}
    assert exists(url, s3.storage)
    assert not exists(join_url(s3.url, "prefix", "other"), s3.storage)


def test_check_access_reports_a_missing_bucket(s3):
    check_access(join_url(s3.url, "new-prefix"), s3.storage)  # a missing prefix is fine
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
        check_access("s3://no-such-bucket/x", s3.storage)
    assert "create it" in info.value.hint


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_check_access_reports_an_unreachable_endpoint(aws_credentials):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    storage = StorageConfig(endpoint_url=endpoint, connect_timeout=1, max_attempts=1)
    with pytest.raises(StorageError, match="unreachable") as info:
        check_access("s3://bucket/x", storage)
    assert endpoint in str(info.value)
    assert "--endpoint-url" in info.value.hint


def test_check_access_reports_missing_credentials(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances hold the old credentials
    with pytest.raises(StorageError, match="no AWS credentials") as info:
        check_access(s3.url, s3.storage)
    assert "AWS_ACCESS_KEY_ID" in info.value.hint
    s3fs.S3FileSystem.clear_instance_cache()


def test_local_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync of the temp, then the rename (or for `write_once` the link), then fsync of the
    folder: after a power cut the file is the old one (or none) or the whole new one."""
    from pipeline.storage import make_temp_file, replace_with

    events: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(descriptor: int) -> None:  # records, then does the real thing
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, destination) -> None:
        events.append(("replace", str(source), str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)

    def link(source, destination) -> None:
        events.append(("link", str(source), str(destination)))
        real_link(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    target = tmp_path / "out" / "shard-000000.tar"
    source = tmp_path / "finished.bin"
    source.write_bytes(b"payload")

    def via_temp() -> None:
        temp = make_temp_file(str(target))
        with open(temp, "wb") as file:
            file.write(b"payload")
        replace_with(temp, str(target))

    writers = {
        "write_bytes_atomic": lambda: write_bytes_atomic(str(target), b"payload"),
        "put_file_atomic": lambda: put_file_atomic(str(source), str(target)),
        "replace_with": via_temp,
        "write_once": lambda: write_once(str(target), b"payload"),
    }
    for name, write in writers.items():
        if name == "write_once":
            target.unlink()
        events.clear()
        write()
        assert target.read_bytes() == b"payload"
        assert len(events) == 3, (name, events)
        synced, renamed, folder = events
        operation = "link" if name == "write_once" else "replace"
        assert renamed[0] == operation and renamed[2] == str(target), (name, events)
        assert synced == ("fsync", renamed[1]), (name, events)  # the temp, before its rename
        assert folder == ("fsync", str(target.parent)), (name, events)
        temp_name = os.path.basename(renamed[1])
        assert temp_name.startswith(".shard-000000.tar.") and temp_name.endswith(".tmp")


def test_sweep_removes_only_temps_of_writers_that_are_gone(tmp_path):
    import subprocess

    from pipeline.storage import make_temp_file, sweep_temp_files

    gone = subprocess.Popen(["true"])
    gone.wait()
    live = os.path.basename(make_temp_file(str(tmp_path / "a.parquet")))
    dead = live.replace(f"-{os.getpid()}-", f"-{gone.pid}-")
    tag = live.split(".")[-2][:6]  # ".a.parquet.<host tag>-<pid>-<id>.tmp"
    other_host = live.replace(f".{tag}-", ".000000-" if tag != "000000" else ".111111-")
    old_style = f".b.tar.tmp-{gone.pid}-0a1b2c3d.tar"
    for name in (dead, other_host, old_style, "a.parquet", ".hidden-but-not-a-temp"):
        (tmp_path / name).write_bytes(b"x")
    assert sweep_temp_files(str(tmp_path)) == sorted([dead, old_style])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [live, other_host, "a.parquet", ".hidden-but-not-a-temp"]
    )


def test_temps_bound_for_s3_are_staged_where_a_sweep_finds_them(tmp_path, monkeypatch):
    """A killed `flowray prepare --out s3://...` leaves its staged shard in the local staging
    folder; the next run's sweep (of its s3:// output) removes it, and only it."""
    import subprocess
    import tempfile

    from pipeline.storage import make_temp_file, staging_dir, sweep_temp_files

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = make_temp_file("s3://bucket/fmnist/train/shard-000003.tar")
    assert os.path.dirname(live) == staging_dir() == str(tmp_path / "flowray-staging")
    name = os.path.basename(live)
    assert name.startswith(".shard-000003.tar.") and name.endswith(".tmp")
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = name.replace(f"-{os.getpid()}-", f"-{gone.pid}-")
    (tmp_path / "flowray-staging" / dead).write_bytes(b"half a shard")
    assert sweep_temp_files("s3://bucket/prefix") == [dead]
    assert os.listdir(staging_dir()) == [name]


def _bucket_keys(bucket) -> list[str]:
    listed = bucket.client().list_objects_v2(Bucket=bucket.bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_the_write_once_probe_passes_an_honest_store_and_leaves_nothing(tmp_path, faulty_s3):
    from pipeline.storage import check_write_once

    check_write_once(join_url(faulty_s3.bucket.url, "scores"), faulty_s3.bucket.storage)
    check_write_once(str(tmp_path / "scores"))
    assert _bucket_keys(faulty_s3.direct) == []
    assert os.listdir(tmp_path / "scores") == []
    assert faulty_s3.proxy.counts["conditional_puts"] == 2
    assert faulty_s3.proxy.counts["412"] == 1


def test_a_store_that_ignores_if_none_match_fails_the_probe_with_exit_2(faulty_s3):
    """The store answers 200 to a second conditional create and overwrites: `write_once`'s check
    first still finds a file written before, but a racing writer's PUT overwrites it. The probe
    sees that, and names the store and the fix."""
    from pipeline.storage import WriteOnceUnsupported, _put_if_absent, check_write_once
    from tests.faults.s3_proxy import FaultPlan

    faulty_s3.proxy.set_plan(FaultPlan(conditional_writes="ignore"))
    bucket = faulty_s3.bucket
    url = join_url(bucket.url, "scores", "x.json")
    assert write_once(url, b"first", bucket.storage) is True
    assert write_once(url, b"rerun", bucket.storage) is False
    assert _put_if_absent(url, b"racer", bucket.storage) is True  # what the probe exists to catch
    assert read_bytes(url, bucket.storage) == b"racer"
    with pytest.raises(WriteOnceUnsupported) as info:
        check_write_once(join_url(bucket.url, "scores"), bucket.storage)
    assert info.value.exit_code == 2
    assert bucket.endpoint_url in str(info.value)
    assert "--single-writer" in info.value.hint and "botocore>=1.35.21" in info.value.hint
    assert _bucket_keys(faulty_s3.direct) == ["scores/x.json"]  # the probe object is gone


def test_a_412_without_its_condition_element_means_exists(faulty_s3):
    """MinIO and Ceph RGW answer 412 without <Condition>If-None-Match</Condition>; s3fs makes
    that OSError(EINVAL), which must still read as "the file exists": for the conditional PUT
    that settles a race (called alone here, as when another writer created the key after
    `write_once`'s check) and for the probe."""
    from pipeline.storage import _put_if_absent, check_write_once
    from tests.faults.s3_proxy import FaultPlan

    faulty_s3.proxy.set_plan(FaultPlan(conditional_writes="bare-412"))
    bucket = faulty_s3.bucket
    url = join_url(bucket.url, "scores", "_scoring.json")
    assert write_once(url, b"first", bucket.storage) is True
    assert _put_if_absent(url, b"second", bucket.storage) is False
    assert read_bytes(url, bucket.storage) == b"first"
    assert faulty_s3.proxy.counts["412"] == 1
    check_write_once(join_url(bucket.url, "scores"), bucket.storage)
    assert faulty_s3.proxy.counts["412"] == 2


def test_a_409_conflict_is_retried_then_creates_or_finds_the_file(faulty_s3):
    """409 once, then the retry creates the key, or (another writer's key, created after
    `write_once`'s check) is refused with a 412."""
    from pipeline.storage import _put_if_absent
    from tests.faults.s3_proxy import FaultPlan

    bucket = faulty_s3.bucket
    faulty_s3.proxy.set_plan(FaultPlan(put_script={"new.json": ("409",), "old.json": ("409",)}))
    old = join_url(bucket.url, "p", "old.json")
    bucket.client().put_object(Bucket=bucket.bucket, Key="p/old.json", Body=b"theirs")
    assert write_once(join_url(bucket.url, "p", "new.json"), b"ours", bucket.storage) is True
    assert _put_if_absent(old, b"ours", bucket.storage) is False
    assert read_bytes(old, bucket.storage) == b"theirs"
    assert faulty_s3.proxy.counts["409"] == 2


def test_409s_that_never_end_fail_after_bounded_retries(faulty_s3, monkeypatch):
    import pipeline.storage
    from tests.faults.s3_proxy import FaultPlan

    monkeypatch.setattr(pipeline.storage, "_CONFLICT_WAIT_S", 0.001)
    attempts = pipeline.storage._CONFLICT_ATTEMPTS
    faulty_s3.proxy.set_plan(FaultPlan(put_script={"x.json": ("409",) * 50}))
    with pytest.raises(StorageError, match="cannot create .*x.json"):
        write_once(join_url(faulty_s3.bucket.url, "x.json"), b"ours", faulty_s3.bucket.storage)
    assert faulty_s3.proxy.counts["409"] == attempts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAEXAMPLE%2F20261206&X-Amz-Security-Token=FQoGZX"
            "&X-Amz-Signature=9f2c1e failed",
            "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=*** failed",
        ),
        (
            "https://acct.blob.core.windows.net/c/model.bin?sv=2022-11-02&sig=aB%2Bc%3D&se=2026",
            "https://acct.blob.core.windows.net/c/model.bin?sv=2022-11-02&sig=***&se=2026",
        ),
        (
            "'https://bob:pw@h:5000/api?token=t0k&access_token=a1&page=2'",
            "'https://h:5000/api?token=***&access_token=***&page=2'",
        ),
        ("models:/flow@champion s3://b/key@v2?versionId=3", None),
    ],
)
def test_redact_removes_query_string_secrets(text, expected):
    from pipeline.storage import redact, redact_url

    assert redact_url(text) == (expected or text)
    assert redact(text) == (expected or text)


def test_temp_names_stay_within_name_max_for_long_final_names(tmp_path, monkeypatch):
    """A final name of up to 255 bytes (the limit of the name itself) is written through a temp
    that fits too, is unique, and is still swept when its writer is gone."""
    import subprocess
    import tempfile

    from pipeline.storage import NAME_MAX, make_temp_file, sweep_temp_files

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    name = "é" * 121 + "-long.parquet"  # 242 + 13 bytes in UTF-8
    assert len(name.encode()) == NAME_MAX
    url = str(tmp_path / "out" / name)
    write_bytes_atomic(url, b"one")
    assert write_once(url, b"two") is False
    assert write_once(str(tmp_path / "out" / name[1:]), b"three") is True
    assert read_bytes(url) == b"one"
    temps = [make_temp_file(url), make_temp_file(url), make_temp_file(f"s3://bucket/{name}")]
    for temp in temps:
        base = os.path.basename(temp)
        assert len(base.encode()) <= NAME_MAX
        assert base.startswith(".éé") and base.endswith(".tmp")
    assert temps[0] != temps[1]
    gone = subprocess.Popen(["true"])
    gone.wait()
    # A temp left by a writer that is gone, named as that writer names it: a pid with more
    # digits than ours keeps fewer bytes of the final name.
    with monkeypatch.context() as patch:
        patch.setattr(os, "getpid", lambda: gone.pid)
        dead = os.path.basename(make_temp_file(url))
    assert len(dead.encode()) <= NAME_MAX and f"-{gone.pid}-" in dead
    assert sweep_temp_files(str(tmp_path / "out")) == [dead]


def test_write_once_without_hard_links_never_shows_a_partial_file(tmp_path, monkeypatch):
    """Where link(2) is refused, the final name still appears only whole: an observer that looks
    at it before every call made while writing never sees it short (a kill at any of those
    moments would leave what it saw, and a file present counts as final)."""
    import errno
    import sys

    def no_link(source, destination) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    target = str(tmp_path / "shard-000000.parquet")
    data = b"0123456789" * 50_000
    sizes: set[int] = set()

    def observe(frame, event, arg) -> None:
        if event in ("call", "c_call") and os.path.exists(target):
            sizes.add(os.stat(target).st_size)

    sys.setprofile(observe)
    try:
        created = write_once(target, data)
    finally:
        sys.setprofile(None)
    assert created is True
    assert read_bytes(target) == data
    assert sizes <= {len(data)}, f"expected only {len(data)} bytes seen, found sizes {sizes}"
    assert write_once(target, b"other") is False
    assert os.listdir(tmp_path) == ["shard-000000.parquet"]


def test_a_write_that_finds_its_bucket_gone_is_a_runtime_failure(s3):
    """A bucket that vanishes mid-run (an endpoint restarted without its state) fails the write
    with exit 1, not the usage error (2) of a path the user got wrong."""
    s3.client().delete_bucket(Bucket=s3.bucket)
    with pytest.raises(StorageError, match="it was there when the job started") as raised:
        write_bytes_atomic(f"{s3.url}/out/_summary/summary.json", b"{}", s3.storage)
    assert raised.value.exit_code == 1
