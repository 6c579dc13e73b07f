"""WebDataset image shards: the on-storage format and `prepare` (write); the manifest and its
checks live in `pipeline.data.manifest` (re-exported here).

Layout of a prepared dataset, per split (local path or s3:// prefix):

    <out>/<split>/shard-000000.tar     WebDataset tar: <key>.png (+ <key>.cls) per sample
    <out>/<split>/shard-000001.tar     ...
    <out>/<split>/_parts/shard-000000.json   per-shard completion marker (fingerprint + ShardInfo)
    <out>/<split>/manifest.json        `Manifest`, written last and atomically

Keys are `<split>-<index:08d>`, the image's position in the split, so they are stable across
reruns and unique across splits. Images are uint8 PNG (mode L for 1 channel, RGB for 3), lossless:
what the reader decodes is exactly what the source produced. `cls` holds the label in decimal.
Tar members carry mtime 0 and a fixed owner, so the same input gives byte-identical shards.

Writing: each shard is written to a local temp file, hashed, then renamed into place (local) or
uploaded (S3: one PUT or multipart upload, atomic on completion); then its marker is written.
Local temps are hidden and end in ".tmp" (see pipeline.storage), so nothing reading the split
takes one for a shard, and a rerun first removes the temps that a killed run left. A
rerun plans the same shards and skips each one whose marker matches the run's fingerprint and whose
file still has the marker's size and sha256. The manifest is written last, and not rewritten when
it would not change, so a rerun of a finished prepare writes nothing. A prefix holding shards made
with other settings is refused rather than mixed or deleted.

`prepare(..., workers=N)` writes the shards with Ray tasks, at most N at a time, one task per shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import numpy as np

from flowmodel.typed import to_dict
from pipeline.data.images import ImageLimits, encode_png
from pipeline.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    compare_shards,
    load_manifest,
    parse_manifest,
    shard_key,
    shard_name,
)
from pipeline.data.shard_writer import (
    PARTS_DIR,
    TAR_BLOCK,
    TAR_END,
    PrepareError,
    ShardJob,
    ShardResult,
    run_in_process,
    run_with_ray,
)
from pipeline.data.sources import ImageSource
from pipeline.storage import (
    StorageConfig,
    exists,
    join_url,
    read_bytes,
    sweep_temp_files,
    write_bytes_atomic,
)

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "PrepareError",
    "PrepareResult",
    "ShardEvent",
    "ShardInfo",
    "SplitResult",
    "compare_shards",
    "encode_png",
    "load_manifest",
    "prepare",
    "shard_key",
    "shard_name",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardEvent:
    """Progress: one shard finished (written now or found complete)."""

    split: str
    name: str
    count: int
    bytes: int
    written: bool
    done: int  # shards of this split finished so far
    total: int  # shards of this split
    images_done: int
    elapsed: float  # seconds since this split started


@dataclass(frozen=True)
class SplitResult:
    manifest: Manifest
    shards_written: int
    shards_skipped: int
    images_written: int
    seconds: float
    manifest_written: bool


@dataclass(frozen=True)
class PrepareResult:
    out: str
    splits: dict[str, SplitResult]

    @property
    def shards_written(self) -> int:
        return sum(r.shards_written for r in self.splits.values())

    @property
    def shards_skipped(self) -> int:
        return sum(r.shards_skipped for r in self.splits.values())


def _samples_per_shard(
    source: ImageSource, split: str, count: int, shard_samples: int, shard_bytes: int | None
) -> int:
    """Samples per shard: shard_samples, lowered so a shard stays near shard_bytes.

    The size per sample is estimated from the split's first images (PNG size rounded up to tar
    blocks, plus headers), so the plan is the same on every rerun.
    """
    if shard_bytes is None or count == 0:
        return max(1, min(shard_samples, count or 1))
    probe = [i for i in source.read(split, range(min(count, 32))) if i.image is not None]
    if not probe:
        return max(1, min(shard_samples, count))
    per_member = [
        TAR_BLOCK + math.ceil(len(encode_png(i.image)) / TAR_BLOCK) * TAR_BLOCK for i in probe
    ]
    per_sample = float(np.mean(per_member)) + (2 * TAR_BLOCK if source.has_labels else 0)
    by_bytes = int((shard_bytes - TAR_END) // per_sample)
    return max(1, min(shard_samples, by_bytes, count))


def _fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def prepare(
    source: ImageSource,
    out_url: str,
    storage: StorageConfig | None = None,
    *,
    splits: Sequence[str] | None = None,
    shard_samples: int = 10_000,
    shard_bytes: int | None = 256 << 20,
    limit: int | None = None,
    workers: int = 0,
    on_error: Literal["skip", "fail"] = "fail",
    progress: Callable[[ShardEvent], None] | None = None,
) -> PrepareResult:
    """Write `source` as shards + manifest per split under `out_url` (see the module docstring).

    Args:
        source: from `pipeline.data.sources.open_source` or a source class.
        out_url: local path, file:// or s3:// prefix; each split goes to `<out_url>/<split>`.
        splits: the splits to write (default: all the source has).
        shard_samples: most samples per shard.
        shard_bytes: target bytes per shard (estimated up front, so a shard may differ a little);
            None for no byte target.
        limit: at most this many images per split (the first ones), for demos and tests.
        workers: 0 writes in this process; N > 0 runs Ray tasks, N at a time (Ray must be
            initialised, or Ray starts a local instance).
        on_error: a bad source image (undecodable, or over the source's `ImageLimits`: too many
            bytes or pixels) stops prepare ("fail") or is logged with its path, counted in
            `Manifest.skipped_inputs` and left out ("skip"; its key stays unused).
        progress: called after each shard, in completion order.

    Returns:
        What was written and skipped, with each split's manifest.
    """
    if shard_samples < 1:
        raise ValueError(f"shard_samples: expected at least 1, found {shard_samples}")
    if shard_bytes is not None and shard_bytes < 4 * TAR_BLOCK:
        raise ValueError(f"shard_bytes: expected at least {4 * TAR_BLOCK}, found {shard_bytes}")
    available = source.splits()
    chosen = list(splits) if splits else list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise PrepareError(
            f"{source.description} has no split {unknown[0]!r} (it has {', '.join(available)})"
        )
    results = {}
    for split in chosen:
        results[split] = _prepare_split(
            source,
            split,
            join_url(out_url, split),
            storage,
            count=min(available[split], limit) if limit is not None else available[split],
            shard_samples=shard_samples,
            shard_bytes=shard_bytes,
            workers=workers,
            on_error=on_error,
            progress=progress,
        )
    return PrepareResult(out_url, results)


def _prepare_split(
    source: ImageSource,
    split: str,
    split_url: str,
    storage: StorageConfig | None,
    *,
    count: int,
    shard_samples: int,
    shard_bytes: int | None,
    workers: int,
    on_error: Literal["skip", "fail"],
    progress: Callable[[ShardEvent], None] | None,
) -> SplitResult:
    """Plan the shards, check a previous run's manifest, write what is missing, then the manifest."""
    started = time.perf_counter()
    _sweep_leftovers(split_url, storage)
    per_shard = _samples_per_shard(source, split, count, shard_samples, shard_bytes)
    plans = [
        (i, start, min(start + per_shard, count))
        for i, start in enumerate(range(0, count, per_shard))
    ]
    fingerprint = _split_fingerprint(source, split, count, per_shard)
    manifest_url = join_url(split_url, MANIFEST_NAME)
    previous = _previous_manifest(manifest_url, fingerprint, split_url, storage)
    job = ShardJob(source, split, split_url, storage, fingerprint, on_error)
    tracker = _SplitProgress(split, len(plans), started, progress)
    if workers > 0 and len(plans) > 1:
        run_with_ray(job, plans, tracker.report, workers)
    else:
        run_in_process(job, plans, tracker.report)

    finished = tracker.finished
    shards = tuple(finished[i].info for i, _, _ in plans)
    manifest = Manifest(
        split=split,
        count=sum(info.count for info in shards),
        shape=tuple(source.shape),  # type: ignore[arg-type]
        shards=shards,
        source=source.description,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=fingerprint,
        has_labels=source.has_labels,
        classes=tuple(source.classes) if source.classes else None,
        skipped_inputs=sum(r.skipped_inputs for r in finished.values()),
    )
    manifest, manifest_written = _commit_manifest(manifest, previous, manifest_url, storage)
    written = [r for r in finished.values() if r.written]
    return SplitResult(
        manifest=manifest,
        shards_written=len(written),
        shards_skipped=len(finished) - len(written),
        images_written=sum(r.info.count for r in written),
        seconds=time.perf_counter() - started,
        manifest_written=manifest_written,
    )


def _sweep_leftovers(split_url: str, storage: StorageConfig | None) -> None:
    """A prepare killed before left its temps here; they are ours to remove (not a live
    writer's, see storage.sweep_temp_files)."""
    for folder in (split_url, join_url(split_url, PARTS_DIR)):
        removed = sweep_temp_files(folder, storage)
        if removed:
            logger.info(
                "%s: removed %d temp file(s) of an interrupted run: %s",
                folder,
                len(removed),
                ", ".join(removed[:3]),
            )


def _split_fingerprint(source: ImageSource, split: str, count: int, per_shard: int) -> str:
    """What the split's content depends on; a rerun with another fingerprint is refused."""
    fields = {
        "format": FORMAT,
        "source": source.description,
        "split": split,
        "shape": list(source.shape),
        "count": count,
        "per_shard": per_shard,
        "has_labels": source.has_labels,
        "classes": list(source.classes) if source.classes else None,
    }
    limits = getattr(source, "limits", None)
    if limits is not None and limits != ImageLimits():
        # Other limits skip other images: other shards. Default limits leave the fingerprint of
        # splits prepared before limits existed unchanged.
        fields["limits"] = to_dict(limits)
    return _fingerprint(fields)


def _previous_manifest(
    manifest_url: str, fingerprint: str, split_url: str, storage: StorageConfig | None
) -> Manifest | None:
    """The manifest of an earlier run with the same settings, None when there is none; an
    earlier run with other settings is refused (its shards would mix with ours)."""
    if not exists(manifest_url, storage):
        return None
    previous = parse_manifest(read_bytes(manifest_url, storage), manifest_url)
    if previous.fingerprint != fingerprint:
        raise PrepareError(
            f"{split_url} already holds a split prepared with other settings "
            f"(source {previous.source}, {previous.count} images of shape {list(previous.shape)})",
            hint="write to a new --out, or rerun with the options used before",
        )
    return previous


class _SplitProgress:
    """Collects finished shards (by index) and tells `progress` about each."""

    def __init__(
        self,
        split: str,
        total: int,
        started: float,
        progress: Callable[[ShardEvent], None] | None,
    ) -> None:
        self.split, self.total, self.started, self.progress = split, total, started, progress
        self.finished: dict[int, ShardResult] = {}

    def report(self, result: ShardResult) -> None:
        self.finished[int(result.info.name[6:12])] = result
        if self.progress is None:
            return
        self.progress(
            ShardEvent(
                split=self.split,
                name=result.info.name,
                count=result.info.count,
                bytes=result.info.bytes,
                written=result.written,
                done=len(self.finished),
                total=self.total,
                images_done=sum(r.info.count for r in self.finished.values()),
                elapsed=time.perf_counter() - self.started,
            )
        )


def _commit_manifest(
    manifest: Manifest, previous: Manifest | None, manifest_url: str, storage: StorageConfig | None
) -> tuple[Manifest, bool]:
    """Write the manifest unless an identical one (creation time aside) is there already.
    Returns the manifest in force and whether it was written."""
    if previous is not None and dataclasses.replace(manifest, created=previous.created) == previous:
        return previous, False
    # Last, and atomically: a manifest present means every shard it lists is complete.
    data = json.dumps(to_dict(manifest), indent=1).encode()
    write_bytes_atomic(manifest_url, data, storage)
    return manifest, True
