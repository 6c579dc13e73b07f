"""Create a file only if it is absent: the first writer wins, and nobody ever rewrites it.

    created = write_once(url, data, storage)   # True: this call created it; False: it was there

Scoring uses it for `_scoring.json` (two jobs started together on one prefix: one records its
settings, the other finds them and compares) and for each shard's Parquet file (a file present is
final: neither a late retry nor a concurrent job replaces it).

Local: the bytes go to a hidden temp file in the same folder and are flushed to disk, then the temp
is hard-linked to the final name. link(2) fails with EEXIST when the name exists, so the check and
the creation are one atomic step, and the file appears whole. open(O_CREAT | O_EXCL) then write
would also be exclusive, but a reader could see the file half-written; it is the fallback for
filesystems without hard links.

S3: one PUT with `If-None-Match: *` (S3's conditional write; moto's server honours it too): S3
answers 412 PreconditionFailed when the key exists, which s3fs raises as FileExistsError. A PUT that
succeeded but whose answer was lost and retried also gets a 412: callers that care read the object
back and compare, which tells "ours, answered twice" from "someone else's".
"""

from __future__ import annotations

import contextlib
import errno
import os

from pipeline.storage import (
    StorageConfig,
    StorageError,
    fsspec_filesystem,
    is_s3,
    make_temp_file,
)

__all__ = ["write_once"]


def write_once(url: str, data: bytes, storage: StorageConfig | None = None) -> bool:
    """Create `url` holding `data` unless it exists; True when this call created it.

    Raises:
        StorageError: the storage refused the write for another reason.
    """
    if is_s3(url):
        return _s3_write_once(url, data, storage)
    return _local_write_once(url, data, storage)


def _s3_write_once(url: str, data: bytes, storage: StorageConfig | None) -> bool:
    fs, path = fsspec_filesystem(url, storage)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as err:
        raise StorageError(f"cannot create {url}: {err}") from err
    return True


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _local_write_once(url: str, data: bytes, storage: StorageConfig | None) -> bool:
    _, path = fsspec_filesystem(url, storage)  # an absolute local path
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp = make_temp_file(url)
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _exclusive_open_write(path, data)
        _fsync(folder)  # the new name reaches the disk before we say it exists
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def _exclusive_open_write(path: str, data: bytes) -> bool:
    """O_EXCL creation for filesystems without hard links (see the module docstring)."""
    try:
        file = open(path, "xb")  # noqa: SIM115 (closed below)
    except FileExistsError:
        return False
    with file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return True
