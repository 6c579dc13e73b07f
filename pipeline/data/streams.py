"""Reading bytes from storage through transient faults: bounded retries, resumed where they stopped.

    policy = RetryPolicy()                                  # 6 tries per read, 0.2 s .. 5 s apart
    data = with_retries(lambda: fs.cat_file(path), policy, what=url)
    with ResumingReader(fs, path, policy, what=url) as stream:     # a file-like object
        tarfile.open(fileobj=stream, mode="r|")                   # never sees a fault

Transient: what a retry can cure. S3 5xx and SlowDown, a reset or refused connection, a timeout,
a transfer cut short (aiohttp's ClientPayloadError, botocore's IncompleteRead), and a read that
ends before the object's size (a silent short transfer). s3fs and botocore retry some of these
themselves; this layer catches what gets through them (long bursts), waits with capped
exponential backoff and full jitter, and reopens the object at the byte where the last good read
stopped, so no byte is read twice and nothing above sees the fault.

Not transient, raised at once: a missing object (FileNotFoundError), denied access
(PermissionError, AccessDenied, bad credentials), and any error of our own code.

Pinned to one version: a `ResumingReader` reads the object its first `info` saw. Every reopen
asks for the object's info afresh and compares its version (`version_of`: the ETag on S3, the
stat version on local disk), and an S3 object is read with `If-Match` on the ETag the file was
opened with (s3fs), so a precondition failure mid-read reopens and is compared too. An object replaced in between raises `ObjectReplaced` at once, never retried and never
resumed into: the bytes before and after would be of two files.

When a read still fails after `policy.attempts` tries, or one file needed more than
`policy.max_retries` retries in all, `TransientReadError` (a StorageError) is raised: storage is
failing, the data is not known to be bad, and a rerun may succeed. Callers never count it as bad
data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.storage import StorageError

logger = logging.getLogger(__name__)
T = TypeVar("T")

_STORAGE_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "s3fs", "fsspec", "http")
# Errors of those libraries that no retry cures: credentials, permissions, a wrong request.
_PERMANENT = (
    "NoCredentials",
    "PartialCredentials",
    "ParamValidation",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchKey",
    "NoSuchBucket",
    "InvalidRange",
)


class TransientReadError(StorageError):
    """Storage kept failing after every retry; the data is not known to be bad."""

    hint = "the data is not known to be bad; rerun the job (finished work is kept)"

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles task errors: keep the hint, not only the message.
        return (type(self), (str(self), self.hint))


class ObjectReplaced(Exception):
    """The object was replaced while it was being read: what is there now is another file."""

    def __init__(self, what: str, read: str, found: str, position: int) -> None:
        super().__init__(
            f"{what}: replaced while it was read (at byte {position:,}): opened as {read}, "
            f"found {found} on reopening"
        )
        self.parts = (what, read, found, position)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.parts)  # Ray pickles task errors


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry one file.

    Attributes:
        attempts: tries of one read (or open), the first included.
        base_delay_s, max_delay_s: wait before retry n is uniform in
            [0, min(max_delay_s, base_delay_s * 2**n)] ("full jitter": retries of many readers
            do not arrive together).
        max_retries: retries of one file in all, whatever succeeded in between, so a file
            that fails every other read still ends in bounded time.
    """

    attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    max_retries: int = 30

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.max_retries < 0:
            raise ValueError(
                f"retry policy: expected attempts >= 1 and max_retries >= 0, found "
                f"attempts={self.attempts}, max_retries={self.max_retries}"
            )
        if not 0 <= self.base_delay_s <= self.max_delay_s:
            raise ValueError(
                f"retry policy: expected 0 <= base_delay_s <= max_delay_s, found "
                f"{self.base_delay_s} and {self.max_delay_s}"
            )

    def delay(self, retry: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**retry))


def is_transient(err: BaseException, _depth: int = 0) -> bool:
    """True for a storage fault that a retry may cure (see the module docstring).

    An error that a storage library raised while handling a transient one (s3fs 2026.9 raises
    IndexError on an argument-less FSTimeoutError) counts as that transient error.
    """
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, TransientReadError)
    if isinstance(err, (*permanent, ObjectReplaced)):
        return False
    text = f"{type(err).__name__}: {err}"
    if any(marker in text for marker in _PERMANENT):
        return False
    if isinstance(err, OSError):  # s3fs turns ClientErrors (500, 503) into OSError
        return True
    if type(err).__module__.split(".")[0] in _STORAGE_MODULES:
        return True
    cause = err.__cause__ or err.__context__
    return cause is not None and _depth < 5 and is_transient(cause, _depth + 1)


def version_of(info: dict[str, Any]) -> str:
    """A file's version from an fsspec listing or info entry: `etag:<ETag>` on S3; on local disk
    `stat:<mtime_ns>/<ctime_ns>/<size>/<inode>` from one stat of the file; else the entry's mtime
    or modification time.

    Not the mtime alone: `cp -p`, `rsync -a`, `tar x` and `touch -r` copy it, and some
    filesystems keep it to 1-2 s. A file replaced by another (rsync's rename, tar's unlink and
    create) gets another inode; one written, renamed or re-timed in place another ctime, which no
    tool can set back (a chmod or chown changes it too: the shard is read again, with the same
    result). A content digest would be exact but reads every byte of every shard at each listing.
    """
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    if "ino" in info and info.get("name"):  # fsspec's local filesystem
        try:
            st = os.stat(info["name"])
        except OSError:  # gone since it was listed: the reader finds it missing
            return ""
        return f"stat:{st.st_mtime_ns}/{st.st_ctime_ns}/{st.st_size}/{st.st_ino}"
    mtime = info.get("mtime")
    if mtime is not None:
        return f"mtime:{float(mtime):.6f}"
    modified = info.get("LastModified")
    return f"modified:{modified.isoformat()}" if hasattr(modified, "isoformat") else ""


class _ShortTransfer(OSError):
    """The stream ended before the object's size: a transfer cut without an error."""


def with_retries(call: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """`call()`, retried on transient errors (see the module docstring)."""
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt + 1 == policy.attempts:
                raise TransientReadError(
                    f"{what}: storage kept failing ({type(err).__name__}: {err}) after "
                    f"{policy.attempts} attempts"
                ) from err
            logger.info("%s: %s: %s; retry %d", what, type(err).__name__, err, attempt + 1)
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


class ResumingReader:
    """A read-only binary stream of one object (`path` on the fsspec `fs`) that rides out
    transient faults (module docstring); `retries` counts the retries made."""

    def __init__(self, fs: Any, path: str, policy: RetryPolicy, what: str) -> None:
        self._fs, self._path, self._policy, self._what = fs, path, policy, what
        self._file: Any = None
        self._opened = False
        self._position = 0
        self.retries = 0
        # What this reader reads, whatever a listing said before; every reopen must find it again.
        info = with_retries(lambda: dict(fs.info(path)), policy, what)
        self.size: int = int(info["size"])
        self.version: str = version_of(info)

    def _open(self) -> Any:
        pinned = self.version
        if self._opened:  # a reopen: the object must still be the one first opened
            with contextlib.suppress(Exception):  # a filesystem without a cache to drop
                self._fs.invalidate_cache(self._path)
            now = with_retries(lambda: dict(self._fs.info(self._path)), self._policy, self._what)
            self._check_same(pinned, version_of(now), int(now.get("size", -1)))
        file = self._fs.open(self._path, "rb", block_size=8 << 20)
        self._opened = True
        # s3fs opens with its own HEAD and reads with If-Match on that ETag: it must be ours.
        details = getattr(file, "details", None)
        if isinstance(details, dict) and (details.get("ETag") or details.get("etag")):
            try:
                self._check_same(pinned, version_of(details), int(details.get("size", -1)))
            except ObjectReplaced:
                file.close()
                raise
        if self._position:
            file.seek(self._position)
        return file

    def _check_same(self, pinned: str, found: str, size: int) -> None:
        if (pinned and found != pinned) or size != self.size:
            raise ObjectReplaced(
                self._what,
                f"{self.size:,} bytes, {pinned or 'no version'}",
                f"{size:,} bytes, {found or 'no version'}",
                self._position,
            )

    def read(self, size: int = -1) -> bytes:
        attempt = 0
        while True:
            try:
                if self._file is None:
                    self._file = self._open()
                data = self._file.read(size)
                if not data and size != 0 and self._position < self.size:
                    raise _ShortTransfer(
                        f"stream ended at byte {self._position:,} of {self.size:,}"
                    )
                self._position += len(data)
                return data
            except Exception as err:
                if not is_transient(err):
                    raise
                self.close()
                attempt += 1
                self.retries += 1
                if attempt >= self._policy.attempts or self.retries > self._policy.max_retries:
                    raise TransientReadError(
                        f"{self._what}: storage kept failing at byte {self._position:,} "
                        f"({type(err).__name__}: {err}) after {attempt} attempts "
                        f"({self.retries} retries of this file)"
                    ) from err
                logger.info(
                    "%s: %s at byte %d: %s; retry %d",
                    self._what,
                    type(err).__name__,
                    self._position,
                    err,
                    attempt,
                )
                time.sleep(self._policy.delay(attempt - 1))

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # a broken connection may fail to close; the file is gone anyway
                logger.debug("closing %s after an error failed", self._what, exc_info=True)
            self._file = None

    def __enter__(self) -> ResumingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
