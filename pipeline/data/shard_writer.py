"""Writing one prepared shard: a Ray task (or the driver) turns a range of a source's images into
a WebDataset tar plus its completion marker, skipping the work when a verified shard is there.

Used by `pipeline.data.shards.prepare`, which plans the shards and writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from flowmodel.typed import from_dict, to_dict
from pipeline.data.images import encode_png
from pipeline.data.manifest import ShardInfo, shard_key, shard_name
from pipeline.data.sources import ImageSource, SourceError
from pipeline.errors import FlowrayError
from pipeline.storage import (
    StorageConfig,
    StorageError,
    exists,
    fsspec_filesystem,
    join_url,
    make_temp_file,
    read_bytes,
    replace_with,
    write_bytes_atomic,
)

__all__ = [
    "PARTS_DIR",
    "PrepareError",
    "ShardJob",
    "ShardResult",
    "run_in_process",
    "run_with_ray",
    "write_shard",
]

logger = logging.getLogger(__name__)

PARTS_DIR = "_parts"
TAR_BLOCK = 512
TAR_END = 1024  # two zero blocks close an archive


class PrepareError(FlowrayError, RuntimeError):
    """prepare cannot go on: bad input under on_error="fail", or an output made differently."""


@dataclass(frozen=True)
class ShardJob:
    """What a shard-writing task needs; picklable (the source is a description, not data)."""

    source: ImageSource
    split: str
    split_url: str
    storage: StorageConfig | None
    fingerprint: str
    on_error: Literal["skip", "fail"]


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    written: bool
    skipped_inputs: int


def _sha256_of(url: str, storage: StorageConfig | None) -> str:
    fs, path = fsspec_filesystem(url, storage)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_local(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _complete_shard(job: ShardJob, name: str, start: int) -> ShardResult | None:
    """The shard's record if it is already complete and verified, else None.

    Raises PrepareError when its marker comes from a prepare with other settings.
    """
    marker_url = join_url(job.split_url, PARTS_DIR, name.replace(".tar", ".json"))
    if not exists(marker_url, job.storage):
        return None
    marker = json.loads(read_bytes(marker_url, job.storage))
    if marker.get("fingerprint") != job.fingerprint:
        raise PrepareError(
            f"{job.split_url} already holds shards prepared with other settings "
            f"({name} has fingerprint {str(marker.get('fingerprint'))[:12]}, this run "
            f"{job.fingerprint[:12]})",
            hint="write to a new --out, or rerun with the options used before",
        )
    info = from_dict(ShardInfo, marker["shard"])
    shard_url = join_url(job.split_url, name)
    fs, path = fsspec_filesystem(shard_url, job.storage)
    if info.start != start or not fs.exists(path) or fs.size(path) != info.bytes:
        return None
    if _sha256_of(shard_url, job.storage) != info.sha256:
        logger.warning("%s: sha256 differs from its marker; rewriting it", shard_url)
        return None
    return ShardResult(info, written=False, skipped_inputs=int(marker.get("skipped_inputs", 0)))


def write_shard(job: ShardJob, index: int, start: int, stop: int) -> ShardResult:
    """Write shard `index` holding split images [start, stop), unless it is already complete."""
    import webdataset as wds

    name = shard_name(index)
    done = _complete_shard(job, name, start)
    if done is not None:
        return done
    shard_url = join_url(job.split_url, name)
    temp = make_temp_file(shard_url, ".tar")
    count = skipped = 0
    try:
        # We own the file: TarWriter does not close streams it did not open, and s3fs would only
        # upload on close; so write locally, then rename or upload the finished file.
        with open(temp, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0, user="flowray", group="flowray")
            try:
                for offset, item in enumerate(job.source.read(job.split, range(start, stop))):
                    key = shard_key(job.split, start + offset)
                    if item.error is not None or item.image is None:
                        if job.on_error == "fail":
                            raise PrepareError(
                                f"{job.source.description}: {item.key} (would be {key}): "
                                f"{item.error}",
                                hint="fix or remove the file, or pass --on-error skip",
                            )
                        logger.warning("skipped input %s (%s): %s", item.key, key, item.error)
                        skipped += 1
                        continue
                    sample = {"__key__": key, "png": encode_png(item.image)}
                    if item.label is not None:
                        sample["cls"] = str(item.label).encode("ascii")
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()  # before the stream closes, also on error (the temp is dropped)
        info = ShardInfo(name, count, _sha256_local(temp), os.path.getsize(temp), start)
        replace_with(temp, shard_url, job.storage)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    marker = {"fingerprint": job.fingerprint, "shard": to_dict(info), "skipped_inputs": skipped}
    marker_url = join_url(job.split_url, PARTS_DIR, name.replace(".tar", ".json"))
    write_bytes_atomic(marker_url, json.dumps(marker, indent=1).encode(), job.storage)
    return ShardResult(info, written=True, skipped_inputs=skipped)


def run_in_process(
    job: ShardJob, plans: list[tuple[int, int, int]], report: Callable[[ShardResult], None]
) -> None:
    for index, start, stop in plans:
        report(write_shard(job, index, start, stop))


def run_with_ray(
    job: ShardJob,
    plans: list[tuple[int, int, int]],
    report: Callable[[ShardResult], None],
    workers: int,
) -> None:
    import ray

    task = ray.remote(num_cpus=1, max_retries=1)(write_shard)
    job_ref = ray.put(job)
    queue = list(plans)
    pending: list = []
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                pending.append(task.remote(job_ref, *queue.pop(0)))
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                report(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as err:
                # Show the task's own error (a PrepareError names the input), not Ray's wrapper.
                cause = getattr(err, "cause", None)
                if isinstance(cause, (PrepareError, SourceError, StorageError)):
                    raise cause from None
                raise
    finally:
        for ref in pending:
            ray.cancel(ref)
