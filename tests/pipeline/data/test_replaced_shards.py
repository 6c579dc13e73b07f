"""A shard replaced while it is read is never resumed into: the reopen after a transient fault
finds another version (ETag on S3, the stat version on local disk) and the read stops with
ObjectReplaced, a permanent fault; the reader leaves the shard out with that reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.data import reader, streams
from pipeline.data.inputs import resolve_input
from pipeline.data.reader import ReadOptions, iter_shard
from pipeline.data.streams import ResumingReader, RetryPolicy, is_transient
from pipeline.data.tally import SkipTally
from pipeline.storage import fsspec_filesystem, join_url
from tests.pipeline.data.foreign_shards import make_photos, upload, write_shards

NO_WAIT = RetryPolicy(base_delay_s=0, max_delay_s=0)


class _CutFile:
    """A file whose reads after the first fail with a reset, once `between()` has run."""

    def __init__(self, file: Any, between: Callable[[], None]) -> None:
        self._file, self._between, self._reads = file, between, 0

    def read(self, size: int = -1) -> bytes:
        self._reads += 1
        if self._reads == 2:
            self._between()
            raise ConnectionResetError("connection reset by peer")
        return self._file.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class _CutOnce:
    """A filesystem whose first opened file is cut after its first read (see _CutFile)."""

    def __init__(self, fs: Any, between: Callable[[], None]) -> None:
        self._fs, self._between, self.opened = fs, between, 0

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self.opened += 1
        file = self._fs.open(path, mode, **kwargs)
        return _CutFile(file, self._between) if self.opened == 1 else file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def _replaced(data: bytes) -> bytes:
    """Other bytes of the same size (the end of the tar changed)."""
    return data[: len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2 :])


def _shard(tmp_path: Path, where: str, request) -> tuple[str, Any]:
    local = write_shards(tmp_path / "photos", make_photos(4), per_shard=4)
    if where == "local":
        return str(local[0]), None
    s3 = request.getfixturevalue("s3")
    (url,) = upload(local, join_url(s3.url, "photos"), s3.storage)
    return url, s3.storage


def _replace(url: str, storage: Any) -> Callable[[], None]:
    def between() -> None:
        fs, path = fsspec_filesystem(url, storage)
        data = fs.cat_file(path)
        with fs.open(path, "r+b" if storage is None else "wb") as file:  # in place locally
            file.write(_replaced(data))

    return between


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_replaced_between_reads_is_not_resumed_into(tmp_path, request, where):
    url, storage = _shard(tmp_path, where, request)
    fs, path = fsspec_filesystem(url, storage)
    original = fs.cat_file(path)
    cut = _CutOnce(fs, _replace(url, storage))
    stream = ResumingReader(cut, path, NO_WAIT, what=url)
    assert stream.read(1000) == original[:1000]
    with pytest.raises(Exception) as caught:
        stream.read()  # the cut, then a reopen that finds another object
    err = caught.value
    assert type(err).__name__ == "ObjectReplaced", repr(err)
    assert isinstance(err, streams.ObjectReplaced) and not is_transient(err)
    assert f"{url}: replaced while it was read (at byte 1,000)" in str(err)
    assert f"{len(original):,} bytes" in str(err) and cut.opened == 1  # never reopened
    assert stream.retries == 1


def test_the_reader_leaves_a_replaced_shard_out_with_its_reason(tmp_path, monkeypatch):
    url, _ = _shard(tmp_path, "local", None)
    (ref,) = resolve_input(url).shards

    def cut_filesystem(target: str, storage: Any) -> tuple[Any, str]:
        fs, path = fsspec_filesystem(target, storage)
        return _CutOnce(fs, _replace(url, None)), path

    monkeypatch.setattr(reader, "fsspec_filesystem", cut_filesystem)
    monkeypatch.setattr(reader, "READ_CHUNK", 4096)  # the shard takes several reads
    tally = SkipTally()
    options = ReadOptions(shape=(1, 16, 16), on_error="skip", retry=NO_WAIT)
    rows = list(iter_shard(ref, options, tally.add_outcome))
    outcome = tally.outcome(url)
    assert outcome is not None and not outcome.complete and not outcome.transient
    assert "replaced while it was read" in outcome.reason
    assert all(row["shard_rows"] == -1 for row in rows)  # no row says the shard is whole
