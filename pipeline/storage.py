"""Storage URLs: one place that turns `/path`, `file://` or `s3://bucket/prefix` into filesystems,
so S3-compatible stores with a custom endpoint (MinIO, Ceph, moto) work everywhere by configuration.

    storage = StorageConfig(endpoint_url="http://127.0.0.1:9000")   # or from AWS_ENDPOINT_URL
    fs, path = fsspec_filesystem("s3://data/fmnist/train", storage)  # s3fs, "data/fmnist/train"
    afs, path = arrow_filesystem("s3://data/fmnist/train", storage)  # pyarrow S3FileSystem

Credentials are never part of a `StorageConfig` (boto and the AWS SDK take them from the standard
chain), so a config can be logged, put in MLflow params or pickled into Ray tasks; `StorageError`
messages pass through `redact` as a second guard.

Writes are atomic: a local file appears under its final name only when complete (temp in the same
folder, fsync, `os.replace`, fsync of the folder); an S3 PUT is atomic already. `write_once`
creates a file only if absent (a hard link locally, a conditional PUT on S3).

Local temps are named `.<final name>.<host>-<pid>-<random>.tmp`: hidden and ending in `.tmp`, so no
glob for `*.tar`, `*.parquet` or a manifest matches one. `sweep_temp_files` removes those whose
writer (same host, that pid) no longer runs. Files bound for S3 are staged under the same names in
`<system temp>/flowray-staging/`, and a sweep of any s3:// URL sweeps that folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from flowmodel.errors import FlowrayError

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# `user:password@` (or `user@`) right after a scheme; no "/" before the "@" ("s3://b/key@v2" stays).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
# Secrets carried as query parameters (presigned S3/GCS URLs, Azure SAS, token/key/password names):
# the name stays, so a reader sees which secret was there; the value becomes ***.
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:x-amz-(?:signature|credential)|x-goog-(?:signature|credential)|signature"
    r"|sig|[a-z_.-]*token|password|passwd|pwd|secret|client_secret|api[_-]?key|access[_-]?key)=)"
    r"[^&#;\s\"'<>]+",
    re.IGNORECASE,
)
_USAGE = 2  # the exit code of a usage error (jobs.errors, which pipeline does not import)


class StorageError(FlowrayError, RuntimeError):
    """A storage URL cannot be used: a runtime failure (exit 1: an endpoint down, a refused
    request) unless the raiser says the user's URL or setup is wrong (2)."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "", exit_code: int | None = None) -> None:
        super().__init__(redact(message), redact(hint), exit_code)


@dataclass(frozen=True)
class StorageConfig:
    """Where S3 URLs point; local paths ignore it. Holds no credentials.

    Attributes:
        endpoint_url: S3-compatible endpoint, e.g. "http://127.0.0.1:9000"; None means AWS_ENDPOINT_URL
            from the environment, or AWS itself when that is unset too.
        region: None means AWS_REGION, then AWS_DEFAULT_REGION, then "us-east-1".
        anon: unsigned requests (public buckets); no credentials needed.
        connect_timeout: seconds before a connection attempt fails (kept short so an unreachable
            endpoint is reported in seconds rather than minutes of retries).
        read_timeout: seconds without a byte from an open connection before the request fails
            (and is retried): a stalled transfer costs this long, not forever.
        max_attempts: attempts per request, retries included.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        # Resolved where the config is made (the driver): Ray workers use the same endpoint.
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        region = (
            self.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
            raise ValueError(
                f"endpoint_url: expected http://host:port or https://..., found {endpoint!r}"
            )
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError(
                f"timeouts: expected seconds > 0, found connect_timeout={self.connect_timeout}, "
                f"read_timeout={self.read_timeout}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: expected at least 1, found {self.max_attempts}")
        object.__setattr__(self, "endpoint_url", endpoint)
        object.__setattr__(self, "region", region)

    def describe(self) -> str:
        """One line for logs: endpoint and region, never credentials."""
        return f"endpoint={self.endpoint_url or 'aws'} region={self.region}"


def redact_url(text: str) -> str:
    """`text` with every URL's `user:password@` removed and the values of secret query parameters
    replaced by ***: "https://bob:pw@h/k?X-Amz-Signature=ab" -> "https://h/k?X-Amz-Signature=***".
    """
    return _QUERY_SECRET.sub(r"\g<name>***", _URL_USERINFO.sub(r"\g<scheme>", text))


def redact(text: str) -> str:
    """`redact_url(text)` with the values of AWS credential variables in the environment ***."""
    text = redact_url(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        url = urlparse(url).path
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise StorageError(
            f"unsupported storage URL {url!r}: scheme {scheme}:// is not handled",
            hint="use a local path, file:///path or s3://bucket/prefix",
            exit_code=_USAGE,
        )
    return os.path.abspath(os.path.expanduser(url))


def _s3_path(url: str) -> str:
    path = url.split("://", 1)[1].strip("/")
    if not path:
        raise StorageError(
            f"{url!r} names no bucket", hint="write s3://bucket/prefix", exit_code=_USAGE
        )
    return path


def fsspec_filesystem(
    url: str, storage: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it (absolute local path, or bucket/key)."""
    storage = storage or StorageConfig()
    if not is_s3(url):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), _local_path(url)
    import s3fs

    fs = s3fs.S3FileSystem(
        anon=storage.anon,
        client_kwargs={"region_name": storage.region, "endpoint_url": storage.endpoint_url},
        config_kwargs={
            "connect_timeout": storage.connect_timeout,
            "read_timeout": storage.read_timeout,
            "retries": {"total_max_attempts": storage.max_attempts, "mode": "standard"},
        },
        # Listings must see what other processes wrote a moment ago (rerun checks, readers).
        use_listings_cache=False,
    )
    return fs, _s3_path(url)


def arrow_filesystem(
    url: str, storage: StorageConfig | None = None
) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem for `url` and the path within it (pyarrow ignores AWS_ENDPOINT_URL,
    so the endpoint goes in as endpoint_override + scheme)."""
    import pyarrow.fs as pafs

    storage = storage or StorageConfig()
    if not is_s3(url):
        return pafs.LocalFileSystem(), _local_path(url)
    kwargs: dict[str, Any] = {
        "region": storage.region,
        "anonymous": storage.anon,
        "connect_timeout": storage.connect_timeout,
        "request_timeout": storage.read_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts),
    }
    if storage.endpoint_url:
        parsed = urlparse(storage.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs), _s3_path(url)


def join_url(base: str, *parts: str) -> str:
    """`base` with relative `parts` appended by "/", keeping its scheme."""
    kept = [part.strip("/") for part in parts if part.strip("/")]
    return "/".join([base.rstrip("/") or base, *kept])


@contextlib.contextmanager
def _filesystem(
    url: str, storage: StorageConfig | None, writing: bool = False
) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """`fsspec_filesystem(url, storage)` for the block, whose errors users meet (no endpoint, no
    credentials, no bucket) become StorageError. A write to S3 that finds nothing there lost its
    bucket mid-run (jobs check it at start, and S3 has no folders): a runtime failure, not a
    usage error."""
    try:
        yield fsspec_filesystem(url, storage)
    except FileNotFoundError as err:
        if writing:
            raise StorageError(
                f"cannot write {url}: {err} (it was there when the job started)"
            ) from err
        raise
    except StorageError:
        raise
    except Exception as err:  # botocore/aiohttp errors have no common base worth importing
        raise _storage_error(url, storage, err) from err


def _storage_error(url: str, storage: StorageConfig | None, err: BaseException) -> StorageError:
    storage = storage or StorageConfig()
    name = type(err).__name__
    text = f"{name}: {err}"
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return StorageError(
            f"no AWS credentials found for {url}",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or use anonymous access for public buckets",
            exit_code=_USAGE,
        )
    if any(s in text for s in _UNREACHABLE):
        return StorageError(
            f"S3 endpoint {storage.endpoint_url or 'aws'} is unreachable ({url})",
            hint="start it (make s3-up) or pass the right --endpoint-url / AWS_ENDPOINT_URL",
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return _no_bucket(_s3_path(url).split("/", 1)[0] if is_s3(url) else url, storage)
    if isinstance(err, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return StorageError(
            f"access denied to {url} ({name})", hint="check the credentials and the bucket policy"
        )
    return StorageError(f"cannot access {url}: {text}")


_UNREACHABLE = (
    "EndpointConnectionError",
    "Could not connect",
    "Connect call failed",
    "ClientConnectorError",
    "Cannot connect",
)


def _no_bucket(bucket: str, storage: StorageConfig | None) -> StorageError:
    return StorageError(
        f"bucket {bucket!r} does not exist at {(storage or StorageConfig()).describe()}",
        hint="create it first, or check the URL",
        exit_code=_USAGE,
    )


def check_access(url: str, storage: StorageConfig | None = None) -> None:
    """Fail fast with a StorageError (endpoint, credentials, bucket) before a job starts work; a
    missing prefix is fine (a job may be about to create it)."""
    if not is_s3(url):
        _local_path(url)
        return
    with _filesystem(url, storage) as (fs, path):
        bucket = path.split("/", 1)[0]
        try:
            fs.ls(bucket, detail=False)
        except FileNotFoundError as err:
            raise _no_bucket(bucket, storage) from err


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    with _filesystem(url, storage) as (fs, path):
        return bool(fs.exists(path))


def list_tree(
    url: str, storage: StorageConfig | None = None, recursive: bool = False
) -> dict[str, dict]:
    """{full URL: fsspec info} of the files directly under the prefix `url` (with `recursive`,
    under it at any depth); {} when there is none. One recursive listing beats a walk on S3."""
    with _filesystem(url, storage) as (fs, path):
        try:
            if recursive:
                entries = fs.find(path, detail=True)
            else:
                entries = {e["name"]: e for e in fs.ls(path, detail=True)}
        except FileNotFoundError:
            return {}
    scheme = "s3://" if is_s3(url) else ""
    return {
        scheme + name.rstrip("/"): info
        for name, info in entries.items()
        if info.get("type") == "file"
    }


def list_files(url: str, storage: StorageConfig | None = None) -> dict[str, int]:
    """{name: size in bytes} of the files directly under the prefix `url` (no folders); {} if none."""
    return {
        name.rsplit("/", 1)[-1]: int(info.get("size") or 0)
        for name, info in list_tree(url, storage).items()
    }


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    with _filesystem(url, storage) as (fs, path):
        return fs.cat_file(path)


# A short tag of this host: a pid names a process only together with its host.
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
# The older naming, still swept: ".<name>.tmp-<pid>-<random>[<suffix>]".
_OLD_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")
NAME_MAX = 255  # the longest file name (bytes) the usual filesystems accept


def _local_temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    tail = f".{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    encoded = name.encode()
    if 1 + len(encoded) + len(tail) > NAME_MAX:
        # Keep the start (recognisable in a listing) and a digest of the whole name.
        digest = "~" + hashlib.sha256(encoded).hexdigest()[:12]
        keep = NAME_MAX - 1 - len(digest) - len(tail)
        name = encoded[:keep].decode(errors="ignore") + digest
    return os.path.join(folder, f".{name}{tail}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def sweep_temp_files(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Remove the temps in the local folder `url` made on this host by a process that no longer
    runs (temps of the older naming carry a pid only); return their names, sorted. Temps never
    reach a bucket, so for an s3:// `url` the local `staging_dir` is swept instead."""
    folder = staging_dir() if is_s3(url) else _local_path(url)
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in sorted(names):
        match = _TEMP.match(name) or _OLD_TEMP.match(name)
        if match is None or match.groupdict().get("host", _HOST_TAG) != _HOST_TAG:
            continue
        if _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _fsync_path(path: str) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace_durably(temp: str, path: str) -> None:
    """Rename a complete temp onto `path` so that after a crash either file is whole: the data
    reaches the disk before the rename, and the rename before we return."""
    _fsync_path(temp)
    os.replace(temp, path)
    _fsync_path(os.path.dirname(path))


@contextlib.contextmanager
def _local_temp(path: str) -> Iterator[str]:
    """A new temp file beside `path`, removed if still there after."""
    temp = make_temp_file(path)
    try:
        yield temp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def write_bytes_atomic(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write `data` to `url` so that readers see the old content or all of the new, never a part."""
    if is_s3(url):
        with _filesystem(url, storage, writing=True) as (fs, key):
            fs.pipe_file(key, data)
        return
    path = _local_path(url)
    with _local_temp(path) as temp:
        Path(temp).write_bytes(data)
        _replace_durably(temp, path)


def write_once(url: str, data: bytes, storage: StorageConfig | None = None) -> bool:
    """Create `url` holding `data` unless it exists: the first writer wins and nobody rewrites it.
    Returns True when this call created the file, False when it was there already.

    Local: a synced temp gets the final name by `_name_if_absent`, where the check and the
    creation are one atomic step (except in its last fallback: exclusive against later writers,
    not against one racing it in that instant).

    S3: an existing key is found first (HEAD); else one PUT with `If-None-Match: *` settles a race.
    Any 412 means the key exists (some stores leave out the `<Condition>` AWS names); a 409
    (another conditional write in flight) is retried with backoff. A PUT whose answer was lost and
    retried also gets a 412: callers that care read the object back and compare. On a store that
    ignores the header two racing writers both "create" it: `check_write_once` finds such a store.

    Raises:
        StorageError: S3 refused the write for another reason, or kept answering 409.
    """
    if is_s3(url):
        with _filesystem(url, storage) as (fs, key):
            if fs.exists(key):
                return False
        return _put_if_absent(url, data, storage)
    path = _local_path(url)
    with _local_temp(path) as temp:
        Path(temp).write_bytes(data)
        _fsync_path(temp)
        if not _name_if_absent(temp, path):
            return False
        _fsync_path(os.path.dirname(path))
        return True


# A 409 ConditionalRequestConflict is retried this many times in all, waiting 0.1 s, 0.2 s, ...
_CONFLICT_ATTEMPTS = 6
_CONFLICT_WAIT_S = 0.1


def _put_if_absent(url: str, data: bytes, storage: StorageConfig | None) -> bool:
    """`write_once` on S3 (see there)."""
    import time

    fs, key = fsspec_filesystem(url, storage)
    for attempt in range(_CONFLICT_ATTEMPTS):
        try:
            fs.pipe_file(key, data, mode="create")
        except FileExistsError:  # s3fs: a 412 naming the If-None-Match condition
            return False
        except OSError as err:
            status = _http_status(err)
            if status == 412:  # a 412 without the condition named: exists all the same
                return False
            if status == 409 and attempt + 1 < _CONFLICT_ATTEMPTS:
                time.sleep(_CONFLICT_WAIT_S * 2**attempt)
                continue
            raise StorageError(f"cannot create {url}: {err}") from err
        return True
    raise AssertionError("unreachable")


def _http_status(err: BaseException) -> int | None:
    """The HTTP status behind an error s3fs translated from botocore's ClientError (kept as its
    cause): s3fs turns a 412 whose body names no `<Condition>` into OSError(EINVAL) and a 409
    into OSError(EIO) or EBUSY, so only the response tells them apart."""
    seen: BaseException | None = err
    for _ in range(5):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412"):
                return 412
            if code in ("ConditionalRequestConflict", "409"):
                return 409
            return int(status) if status else None
        seen = seen.__cause__ or seen.__context__
    return None


# What link(2) answers on a filesystem that has no hard links (or not across this pair).
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)
# What renameat2(2) answers when the kernel or the filesystem has no RENAME_NOREPLACE.
_NO_NOREPLACE = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2_noreplace(temp: str, path: str) -> None:
    """rename(temp, path) that fails with FileExistsError when `path` exists (Linux renameat2);
    OSError(ENOSYS) where the C library has no renameat2."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    result = function(_AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def _name_if_absent(temp: str, path: str) -> bool:
    """Give the complete `temp` the name `path` unless `path` exists (then False): link(2), which
    refuses an existing name; without hard links, renameat2(2) with RENAME_NOREPLACE; without
    that either, a rename after a check that the name is free."""
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
    try:
        _renameat2_noreplace(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_NOREPLACE:
            raise
    if os.path.exists(path):
        return False
    os.replace(temp, path)
    return True


class WriteOnceUnsupported(StorageError):
    """The store under an output prefix accepted a second create of one object."""


def check_write_once(url: str, storage: StorageConfig | None = None) -> None:
    """Prove that `write_once` holds under the prefix `url` before a job relies on it: create one
    hidden object twice and require the second create itself (on S3 the conditional PUT, not the
    check before it) to be refused; the object is removed after. Some S3-compatible stores ignore
    `If-None-Match: *` (and s3fs before 2024.12, or botocore before 1.35.21, drop it silently).

    Raises:
        WriteOnceUnsupported (exit code 2): the second create was accepted.
        StorageError: the probe could not be written or removed.
    """
    probe = join_url(url, f".flowray-write-once-probe-{_HOST_TAG}-{uuid.uuid4().hex[:12]}")
    create = _put_if_absent if is_s3(url) else write_once
    try:
        if not create(probe, b"first", storage):
            raise StorageError(f"write-once probe {probe} existed before it was created")
        refused = not create(probe, b"second", storage)
    finally:
        with contextlib.suppress(FileNotFoundError), _filesystem(probe, storage) as (fs, path):
            fs.rm_file(path)
    if refused:
        return
    store = f"S3 endpoint {(storage or StorageConfig()).describe()}" if is_s3(url) else "filesystem"
    raise WriteOnceUnsupported(
        f"{store} accepted a second create of {probe}: expected it refused (412 to If-None-Match: "
        f"*), found it overwritten, so two jobs writing under {url} at once could overwrite each "
        "other's files",
        hint="use a store that honours conditional writes (AWS S3, or an S3-compatible store and "
        "version that supports If-None-Match), with s3fs>=2024.12 and botocore>=1.35.21; or, when "
        "no other job ever writes to this output at the same time, pass --single-writer",
        exit_code=_USAGE,
    )


def put_file_atomic(local_file: str, url: str, storage: StorageConfig | None = None) -> None:
    """Copy a finished local file to `url` atomically (see `write_bytes_atomic`)."""
    if is_s3(url):
        with _filesystem(url, storage, writing=True) as (fs, key):
            fs.put_file(local_file, key)
        return
    path = _local_path(url)
    if os.path.abspath(local_file) == path:
        return
    with _local_temp(path) as temp:
        shutil.copyfile(local_file, temp)
        _replace_durably(temp, path)


def staging_dir() -> str:
    """The local folder where files bound for S3 are written before their upload (created)."""
    folder = os.path.join(tempfile.gettempdir(), "flowray-staging")
    os.makedirs(folder, exist_ok=True)
    return folder


def make_temp_file(url: str) -> str:
    """A new empty local temp file that `replace_with` can move to `url`: beside a local `url`
    (same filesystem, so a rename), in `staging_dir()` for an S3 one; a sweep finds either."""
    if is_s3(url):
        path = os.path.join(staging_dir(), url.rstrip("/").rsplit("/", 1)[-1] or "object")
    else:
        path = _local_path(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    name = _local_temp_name(path)
    # Not mkstemp: its 0600 mode would survive the rename; open() applies the umask instead.
    with open(name, "xb"):
        pass
    return name


def replace_with(local_file: str, url: str, storage: StorageConfig | None = None) -> None:
    """Move a finished temp file from `make_temp_file` to `url` atomically, then drop the temp."""
    try:
        if is_s3(url):
            put_file_atomic(local_file, url, storage)
        else:
            _replace_durably(local_file, _local_path(url))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(local_file)
