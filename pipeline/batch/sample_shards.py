"""Sampling's output shards: consecutive PNG samples into WebDataset tar files of a fixed size,
each written atomically, their ShardInfo collected for the manifest."""

from __future__ import annotations

import hashlib
import os
from typing import IO, Any

from pipeline.data.shards import ShardInfo, shard_key, shard_name
from pipeline.storage import StorageConfig, join_url, make_temp_file, replace_with

__all__ = ["SampleShardWriter"]


class SampleShardWriter:
    """Writes consecutive samples of `split` into shards of `per_shard` under `output`.

    A shard goes to a local temp file, then is renamed or uploaded whole (`replace_with`), so a
    shard present is complete. `infos` lists the shards written, in order; `abort` drops the one
    being written.
    """

    def __init__(self, output: str, storage: StorageConfig, split: str, per_shard: int) -> None:
        self.output, self.storage, self.split, self.per_shard = output, storage, split, per_shard
        self.infos: list[ShardInfo] = []
        self.index = 0  # next sample index
        self._writer: Any = None  # webdataset.TarWriter of the open shard
        self._stream: IO[bytes] | None = None
        self._temp = ""
        self._start = self._count = 0

    def write(self, png: bytes) -> None:
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": shard_key(self.split, self.index), "png": png})
        self.index += 1
        self._count += 1
        if self._count == self.per_shard:
            self.close()

    def _open(self) -> None:
        import webdataset as wds

        self._temp = make_temp_file(join_url(self.output, shard_name(len(self.infos))))
        self._stream = open(self._temp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._writer = wds.TarWriter(
            self._stream, encoder=False, mtime=0, user="flowray", group="flowray"
        )
        self._start, self._count = self.index, 0

    def close(self) -> None:
        """Finish the open shard, if any: close, hash, move into place."""
        if self._writer is None or self._stream is None:
            return
        # We own the stream: TarWriter does not close streams it did not open.
        self._writer.close()
        self._stream.close()
        digest = hashlib.sha256()
        with open(self._temp, "rb") as file:
            while chunk := file.read(8 << 20):
                digest.update(chunk)
        name = shard_name(len(self.infos))
        info = ShardInfo(
            name, self._count, digest.hexdigest(), os.path.getsize(self._temp), self._start
        )
        replace_with(self._temp, join_url(self.output, name), self.storage)
        self.infos.append(info)
        self._writer = self._stream = None

    def abort(self) -> None:
        """Drop the open shard's temp file (the run failed; nothing partial is left)."""
        if self._writer is not None and self._stream is not None:
            self._stream.close()
            if os.path.exists(self._temp):
                os.remove(self._temp)
            self._writer = self._stream = None
