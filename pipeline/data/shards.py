"""Prepared splits: the WebDataset shards + manifest format, its checks, and `prepare` (write).

    <out>/<split>/shard-000000.tar           WebDataset tar: <key>.png (+ <key>.cls) per sample
    <out>/<split>/_parts/shard-000000.json   per-shard completion marker (fingerprint + ShardInfo)
    <out>/<split>/manifest.json              `Manifest`: count, shape, labels, and per shard its
                                             name, sample count, size and sha256 (`ShardInfo`)

Keys are `<split>-<index:08d>`, the image's position in the split: stable across reruns, unique
across splits. Images are lossless uint8 PNG (mode L or RGB); `cls` holds the label in decimal.
Tar members carry mtime 0 and a fixed owner, so the same input gives byte-identical shards.

Each shard is written to a local temp, hashed, then moved whole into place (`ShardWriter`), then
its marker is written. A rerun removes the temps a killed run left, and skips each shard whose
marker matches the run's fingerprint and whose file still has the marker's size and sha256. The
manifest is written last, atomically, and only when it changes: a manifest present means every
shard it lists is complete. A prefix holding shards made with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

import numpy as np

from flowmodel.errors import FlowrayError
from flowmodel.typed import ConfigError, from_dict, to_dict
from pipeline.data.images import ImageLimits, encode_png
from pipeline.data.tally import OnError
from pipeline.storage import (
    StorageConfig,
    exists,
    fsspec_filesystem,
    join_url,
    list_files,
    make_temp_file,
    read_bytes,
    replace_with,
    sweep_temp_files,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

FORMAT = "flowray-shards/1"
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
TAR_BLOCK = 512
TAR_END = 1024  # two zero blocks close an archive


class ManifestError(FlowrayError, ValueError):
    """A split's manifest is missing, invalid or disagrees with the shards present."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it. `start` is the split index of its first key."""

    name: str
    count: int
    sha256: str
    bytes: int
    start: int = 0


@dataclass(frozen=True)
class Manifest:
    """What a split holds; parsed with `flowmodel.typed.from_dict`, so unknown keys are refused."""

    split: str
    count: int
    shape: tuple[int, int, int]  # [C, H, W]
    shards: tuple[ShardInfo, ...]
    source: str
    created: str  # ISO 8601, UTC
    fingerprint: str  # hash of everything that decides the shards' content
    has_labels: bool = False
    classes: tuple[str, ...] | None = None
    dtype: str = "uint8"
    n_bits: int = 8
    encoding: str = "png"
    skipped_inputs: int = 0  # source images that could not be decoded (on_error="skip")
    format: str = FORMAT


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


@dataclass(frozen=True)
class ShardDiff:
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    wrong_size: tuple[tuple[str, int, int], ...]  # (name, bytes found, bytes expected)


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def is_shard_file(name: str) -> bool:
    """A `.tar` file that is not hidden: temps (".shard-000001.tar.<host>-<pid>-<id>.tmp", or
    ".tar"-ending ones a killed writer left) are never shards."""
    return name.endswith(".tar") and not name.startswith(".")


def compare_shards(manifest: Manifest, files: dict[str, int]) -> ShardDiff:
    """Shards the manifest lists versus the shard files present ({name: size})."""
    listed = {info.name: info for info in manifest.shards}
    present = {name: size for name, size in files.items() if is_shard_file(name)}
    return ShardDiff(
        missing=tuple(sorted(set(listed) - set(present))),
        extra=tuple(sorted(set(present) - set(listed))),
        wrong_size=tuple(
            (name, present[name], info.bytes)
            for name, info in sorted(listed.items())
            if name in present and present[name] != info.bytes
        ),
    )


def read_manifest(where: str, storage: StorageConfig | None) -> Manifest:
    """The manifest at `where`, parsed and checked (ManifestError when it is not valid)."""
    try:
        manifest = from_dict(Manifest, json.loads(read_bytes(where, storage)))
    except (ConfigError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{where} is not a valid shard manifest: {err}") from err
    if manifest.format != FORMAT:
        raise ManifestError(f"{where}: expected format {FORMAT}, found {manifest.format}")
    if sum(info.count for info in manifest.shards) != manifest.count:
        raise ManifestError(f"{where}: shard counts do not add up to count={manifest.count}")
    return manifest


def check_shard_files(manifest: Manifest, files: dict[str, int], where: str) -> None:
    """ManifestError when the shard files present ({name: size}) disagree with `manifest`."""
    diff = compare_shards(manifest, files)
    parts = [f"missing {_few(diff.missing)}"] if diff.missing else []
    if diff.extra:
        parts.append(f"not in the manifest {_few(diff.extra)}")
    parts += [
        f"{name} has {found} bytes, manifest says {size}"
        for name, found, size in diff.wrong_size[:3]
    ]
    if parts:
        raise ManifestError(
            f"{where} disagrees with the shards present: {'; '.join(parts)}",
            hint="rerun `flowray prepare` with the same options to repair missing shards",
        )


def load_manifest(
    split_url: str, storage: StorageConfig | None = None, *, check_shards: bool = True
) -> Manifest:
    """The manifest of the split at `split_url`, checked against the shards present
    (`check_shards`); ManifestError when it is missing, invalid or disagrees with them."""
    files = list_files(split_url, storage)
    if not files:
        raise ManifestError(
            f"no data at {split_url}: expected {MANIFEST_NAME} and shard-*.tar files",
            hint="run `flowray prepare --output <data>` first and pass <data>/<split>, e.g. .../train",
        )
    if MANIFEST_NAME not in files:
        tars = [n for n in files if is_shard_file(n)]
        if tars:
            raise ManifestError(
                f"{split_url} has {len(tars)} shard files but no {MANIFEST_NAME}: "
                "prepare did not finish",
                hint="rerun `flowray prepare` with the same options; it completes what is missing",
            )
        raise ManifestError(
            f"{split_url} holds no {MANIFEST_NAME} and no shards (found {_few(sorted(files))})",
            hint="pass a split folder written by `flowray prepare`, e.g. <data>/train",
        )
    where = join_url(split_url, MANIFEST_NAME)
    manifest = read_manifest(where, storage)
    if check_shards:
        check_shard_files(manifest, files, where)
    return manifest


class SourceImage(NamedTuple):
    """One image of a source: uint8 [C, H, W] in the source's shape, or None with `error` set
    (a bad input: the caller's on_error policy decides)."""

    key: str  # where it came from ("cats/0001.jpg", "t10k-images-idx3-ubyte.gz#42")
    image: np.ndarray | None
    label: int | None
    error: str | None = None


class ImageSource(Protocol):
    """What prepare reads (`pipeline.data.sources`): `read(split, indices)` gives a SourceImage
    per index, in order, indices ascending; a small picklable description, sent to Ray tasks."""

    description: str  # what it reads; part of prepare's fingerprint
    shape: tuple[int, int, int]  # (C, H, W) of every image it gives
    classes: tuple[str, ...] | None
    has_labels: bool

    def splits(self) -> dict[str, int]: ...
    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]: ...


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
    on_error: OnError


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    written: bool
    skipped_inputs: int


def _sha256(file: Any) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _marker_url(job: ShardJob, name: str) -> str:
    return join_url(job.split_url, PARTS_DIR, name.replace(".tar", ".json"))


def _complete_shard(job: ShardJob, name: str, start: int) -> ShardResult | None:
    """The shard's record if it is already complete and verified, else None; PrepareError when
    its marker comes from a prepare with other settings."""
    marker_url = _marker_url(job, name)
    if not exists(marker_url, job.storage):
        return None
    marker = json.loads(read_bytes(marker_url, job.storage))
    if marker.get("fingerprint") != job.fingerprint:
        raise PrepareError(
            f"{job.split_url} already holds shards prepared with other settings "
            f"({name} has fingerprint {str(marker.get('fingerprint'))[:12]}, this run "
            f"{job.fingerprint[:12]})",
            hint="write to a new --output, or rerun with the options used before",
        )
    info = from_dict(ShardInfo, marker["shard"])
    shard_url = join_url(job.split_url, name)
    fs, path = fsspec_filesystem(shard_url, job.storage)
    if info.start != start or not fs.exists(path) or fs.size(path) != info.bytes:
        return None
    with fs.open(path, "rb") as file:
        same = _sha256(file) == info.sha256
    if not same:
        logger.warning("%s: sha256 differs from its marker; rewriting it", shard_url)
        return None
    return ShardResult(info, written=False, skipped_inputs=int(marker.get("skipped_inputs", 0)))


class ShardWriter:
    """One shard: samples go to a local temp through webdataset's TarWriter (s3fs would upload
    only on close), then `close` hashes the temp and moves it whole to `url` (`replace_with`), so a
    shard present is complete; `abort` drops the temp."""

    def __init__(self, url: str, storage: StorageConfig | None, start: int) -> None:
        import webdataset as wds

        self.url, self.storage, self.start, self.count = url, storage, start, 0
        self._temp = make_temp_file(url)
        self._stream = open(self._temp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._tar = wds.TarWriter(
            self._stream, encoder=False, mtime=0, user="flowray", group="flowray"
        )

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.count += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        self._stream.close()  # ours: TarWriter does not close a stream it did not open
        with open(self._temp, "rb") as file:
            digest = _sha256(file)
        name = self.url.rsplit("/", 1)[-1]
        info = ShardInfo(name, self.count, digest, os.path.getsize(self._temp), self.start)
        replace_with(self._temp, self.url, self.storage)
        return info

    def abort(self) -> None:
        # The tar first: closed later by the garbage collector, it would write to a closed file.
        with suppress(OSError, ValueError):
            self._tar.close()
        self._stream.close()
        with suppress(FileNotFoundError):
            os.remove(self._temp)


def write_shard(job: ShardJob, index: int, start: int, stop: int) -> ShardResult:
    """Write shard `index` holding split images [start, stop), unless it is already complete."""
    name = shard_name(index)
    done = _complete_shard(job, name, start)
    if done is not None:
        return done
    shard = ShardWriter(join_url(job.split_url, name), job.storage, start)
    skipped = 0
    try:
        for offset, item in enumerate(job.source.read(job.split, range(start, stop))):
            key = shard_key(job.split, start + offset)
            if item.error is not None or item.image is None:
                if job.on_error == "fail":
                    raise PrepareError(
                        f"{job.source.description}: {item.key} (would be {key}): {item.error}",
                        hint="fix or remove the file, or pass --on-error skip",
                    )
                logger.warning("skipped input %s (%s): %s", item.key, key, item.error)
                skipped += 1
                continue
            sample = {"__key__": key, "png": encode_png(item.image)}
            if item.label is not None:
                sample["cls"] = str(item.label).encode("ascii")
            shard.write(sample)
        info = shard.close()
    except BaseException:
        shard.abort()
        raise
    marker = {"fingerprint": job.fingerprint, "shard": to_dict(info), "skipped_inputs": skipped}
    write_bytes_atomic(_marker_url(job, name), json.dumps(marker, indent=1).encode(), job.storage)
    return ShardResult(info, written=True, skipped_inputs=skipped)


def _run_with_ray(
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
                if isinstance(cause, FlowrayError):
                    raise cause from None
                raise
    finally:
        for ref in pending:
            ray.cancel(ref)


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


def _samples_per_shard(
    source: ImageSource, split: str, count: int, shard_samples: int, shard_bytes: int | None
) -> int:
    """Samples per shard: shard_samples, lowered so a shard stays near shard_bytes, estimated
    from the split's first images (so the plan is the same on every rerun)."""
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
    on_error: OnError = "fail",
    progress: Callable[[ShardEvent], None] | None = None,
) -> PrepareResult:
    """Write `source` as shards + manifest per split under `<out_url>/<split>`.

    Args:
        shard_bytes: target bytes per shard (estimated up front); None for no byte target.
        limit: at most this many images per split (the first ones).
        workers: 0 writes in this process; N > 0 runs one Ray task per shard, N at a time.
        on_error: a bad source image stops prepare ("fail") or is logged, counted in
            `Manifest.skipped_inputs` and left out ("skip"; its key stays unused).
        progress: called after each shard, in completion order.
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
        started = time.perf_counter()
        split_url = join_url(out_url, split)
        _sweep_leftovers(split_url, storage)
        count = min(available[split], limit) if limit is not None else available[split]
        per_shard = _samples_per_shard(source, split, count, shard_samples, shard_bytes)
        plans = [
            (i, start, min(start + per_shard, count))
            for i, start in enumerate(range(0, count, per_shard))
        ]
        fingerprint = _split_fingerprint(source, split, count, per_shard)
        job = ShardJob(source, split, split_url, storage, fingerprint, on_error)
        results[split] = _prepare_split(job, plans, workers, progress, started)
    return PrepareResult(out_url, results)


def _prepare_split(
    job: ShardJob,
    plans: list[tuple[int, int, int]],
    workers: int,
    progress: Callable[[ShardEvent], None] | None,
    started: float,
) -> SplitResult:
    """Check a previous run's manifest, write the shards `plans` lists that are missing, then
    the manifest."""
    source, split, storage = job.source, job.split, job.storage
    manifest_url = join_url(job.split_url, MANIFEST_NAME)
    previous = existing_manifest(manifest_url, storage)
    if previous is not None and previous.fingerprint != job.fingerprint:
        # An earlier run with other settings: its shards would mix with ours.
        raise PrepareError(
            f"{job.split_url} already holds a split prepared with other settings "
            f"(source {previous.source}, {previous.count} images of shape {list(previous.shape)})",
            hint="write to a new --output, or rerun with the options used before",
        )
    finished: dict[int, ShardResult] = {}  # by shard index

    def report(result: ShardResult) -> None:
        info = result.info
        finished[int(info.name[6:12])] = result
        if progress is not None:
            done = (len(finished), len(plans), sum(r.info.count for r in finished.values()))
            elapsed = time.perf_counter() - started
            progress(
                ShardEvent(split, info.name, info.count, info.bytes, result.written, *done, elapsed)
            )

    if workers > 0 and len(plans) > 1:
        _run_with_ray(job, plans, report, workers)
    else:
        for plan in plans:
            report(write_shard(job, *plan))
    shards = tuple(finished[i].info for i, _, _ in plans)
    manifest = Manifest(
        split=split,
        count=sum(info.count for info in shards),
        shape=tuple(source.shape),  # type: ignore[arg-type]
        shards=shards,
        source=source.description,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=job.fingerprint,
        has_labels=source.has_labels,
        classes=tuple(source.classes) if source.classes else None,
        skipped_inputs=sum(r.skipped_inputs for r in finished.values()),
    )
    if previous is not None and replace(manifest, created=previous.created) == previous:
        manifest, manifest_written = previous, False  # the same, creation time aside
    else:
        write_manifest(manifest_url, manifest, storage)
        manifest_written = True
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
    """Remove the temps a killed prepare left (`sweep_temp_files` spares live writers')."""
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
        # Other limits skip other images; default limits add no key, keeping older fingerprints.
        fields["limits"] = to_dict(limits)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def existing_manifest(manifest_url: str, storage: StorageConfig | None) -> Manifest | None:
    """The manifest at `manifest_url`, None when there is none."""
    return read_manifest(manifest_url, storage) if exists(manifest_url, storage) else None


def write_manifest(manifest_url: str, manifest: Manifest, storage: StorageConfig | None) -> None:
    """Last, and atomically: a manifest present means every shard it lists is complete."""
    write_bytes_atomic(manifest_url, json.dumps(to_dict(manifest), indent=1).encode(), storage)
