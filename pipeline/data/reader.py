"""Read a prepared split as rows: a streaming Ray Data dataset, or a plain iterator; one decode path.

    from pipeline.data.reader import SkipTally, iter_split, read_split

    ds = read_split("s3://data/fmnist/train", storage)            # ray.data.Dataset, lazy
    for batch in ds.iter_batches(batch_size=256): ...

    tally = SkipTally.shared()                                     # a Ray actor; see tally.py
    ds = read_split(url, storage, on_error="skip", tally=tally)
    ...consume ds (here, or in Ray Train workers)...
    tally.left_out()          # [ShardOutcome(shard, complete=False, reason=...)] shards not read whole
    tally.outcomes()          # {shard: ShardOutcome}: rows, skipped_keys, retries
    print(tally.total(), tally.by_shard(), tally.records()[:5])

    for row in iter_split(url, storage): ...                       # same rows, no Ray

Rows (one per image; the same from both readers):
    key: str            "<split>-<index:08d>", stable across reruns of prepare
    shard: str          the shard's file name, e.g. "shard-000003.tar"
    image: uint8 ndarray [C, H, W], C, H and W as the manifest says
    label: int          the `cls` label, -1 when the split has none
    nbytes: int         length of the encoded PNG in the shard

Streaming: each Ray read task reads whole shards one after another, through a tar stream, and
emits blocks of `rows_per_block` rows, so the dataset is never materialised; a subset of shards is
read with `shards=[names]` (scoring goes shard by shard and skips finished ones).

Shuffling (training): `shuffle=True` permutes the shard order every time the dataset executes
(every epoch: Ray Data plans the read again, with seed + epoch when a seed is given), and permutes
the rows within each shard (a shard is at most `shard_samples` images, so that buffer is bounded).
For mixing across shards, add Ray Data's `local_shuffle_buffer_size=...` in
`iter_batches`/`iter_torch_batches`.

Storage faults are not bad data. Bytes come through `streams.ResumingReader`: a 5xx, a SlowDown, a
reset, a timeout or a transfer cut short is retried with bounded backoff and the read resumes at
the byte it reached, so nothing above sees it. When storage keeps failing past `retry`, the shard
is left out as `transient` under "skip" (a rerun reads it) and `TransientReadError` (a
StorageError) is raised under "fail"; it is never counted as a bad image.

Bad data, under `on_error`:
    a bad image: a member read whole that does not decode, has the wrong mode or size, breaks the
    `limits` (checked from its tar header and its image header, before decoding), or a sample
    without a PNG or with a bad `cls`                                         -> that sample
    a shard that cannot be read whole: missing; another size or sha256 than the manifest's; a tar
    that ends early or is unreadable; fewer or more samples than the manifest lists -> the shard
"fail" raises `CorruptDataError` naming the shard and key ("*" for a whole shard); through Ray it
arrives as RayTaskError(CorruptDataError), an instance of both, so `except CorruptDataError` works
in the driver. "skip" logs a warning with shard and key (logger `pipeline.data.reader`), reports
to the tally (a bad image: its key in the shard's `skipped_keys`; a shard: `complete=False` with
its reason) and goes on. A tally is required with on_error="skip".

Whole shards: a shard's outcome is reported before its last row is handed on, and that row only
if the shard is complete; so once a consumer holds every row the manifest lists for a shard, that
shard was read whole and verified (size, sha256, sample count). Rows of a shard that turns out
incomplete may have been handed on before the problem showed: consumers that need whole shards
(scoring) drop a shard whose outcome says `complete=False`.

Before any work, the manifest is compared with the shards present. Under "fail": a shard file it
does not list is a `ManifestError`, and a listed shard that is missing or has another size is a
`CorruptDataError` naming it. Under "skip": unlisted files are
logged and ignored, and listed shards that are missing or have another size are reported as left
out and not read; every other shard is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.data.images import ImageLimits, decode_image
from pipeline.data.manifest import Manifest, ManifestError, compare_shards, load_manifest
from pipeline.data.shard_reader import WHOLE_SHARD, Report, iter_shard, refused_shard
from pipeline.data.streams import RetryPolicy, TransientReadError
from pipeline.data.tally import ShardOutcome, Skipped, SkipTally
from pipeline.errors import FlowrayError
from pipeline.storage import StorageConfig, join_url, list_files

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "COLUMNS",
    "CorruptDataError",
    "ImageLimits",
    "RetryPolicy",
    "ShardOutcome",
    "SkipTally",
    "Skipped",
    "TransientReadError",
    "decode_image",
    "iter_shard",
    "iter_split",
    "read_split",
]

logger = logging.getLogger(__name__)

OnError = Literal["skip", "fail"]
COLUMNS = ("key", "shard", "image", "label", "nbytes")


class CorruptDataError(FlowrayError, RuntimeError):
    """A sample or shard cannot be read (on_error="fail"); names the shard and the key.

    Broken data found mid-run is a runtime failure (exit 1), not a usage error.
    """

    exit_code = 1  # jobs.errors.EXIT_FAILURE

    hint = (
        "pass --on-error skip (score) or --set data.on_error=skip (train) to leave unreadable "
        "images out (they are counted)"
    )

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"shard {shard}, key {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles task errors; keep the three fields, not the formatted message.
        return (type(self), (self.shard, self.key, self.reason))


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class _Spec:
    """Everything a read task needs (picklable; the storage config holds no credentials)."""

    split_url: str
    storage: StorageConfig | None
    manifest: Manifest
    on_error: OnError
    tally: SkipTally | None
    limits: ImageLimits = ImageLimits()
    retry: RetryPolicy = RetryPolicy()


def _read_shards(
    spec: _Spec, names: Sequence[str], seed: int | None, shuffle: bool
) -> Iterator[dict]:
    rng = np.random.default_rng(seed) if shuffle else None
    report = spec.tally.add_outcome if spec.tally is not None else None
    for name in names:
        rows = iter_shard(
            join_url(spec.split_url, name),
            spec.manifest.shard(name),
            spec.manifest,
            spec.storage,
            on_error=spec.on_error,
            limits=spec.limits,
            retry=spec.retry,
            report=report,
        )
        if rng is not None:
            buffered = list(rows)  # one shard: bounded by prepare's shard size
            yield from (buffered[i] for i in rng.permutation(len(buffered)))
        else:
            yield from rows


def _size_reason(found: int, expected: int) -> str:
    return f"shard has {found:,} bytes, manifest says {expected:,} (truncated or replaced)"


def _check_shards_present(
    split_url: str,
    manifest: Manifest,
    names: list[str],
    spec: _Spec,
    storage: StorageConfig | None,
    files: dict[str, int] | None = None,
    report: Report | None = None,
) -> list[str]:
    """`names` less the shards that are missing or have another size than the manifest's.

    Under "fail" such a shard, or a shard file the manifest does not list, raises before any
    work; under "skip" the bad shards are reported (`report`, default: the tally) as left out.
    `files` ({name: size}) is a listing the caller made already; None lists the split.
    """
    diff = compare_shards(manifest, list_files(split_url, storage) if files is None else files)
    where = join_url(split_url, "manifest.json")
    if spec.on_error == "fail":
        if diff.extra:
            raise ManifestError(
                f"{where} disagrees with the shards present: {diff.describe()}",
                hint="a prefix holds one prepared split; rerun prepare into a new --out",
            )
        sizes = {name: (found, expected) for name, found, expected in diff.wrong_size}
        for name in names:
            if name in diff.missing:
                raise CorruptDataError(
                    name, WHOLE_SHARD, f"shard missing at {join_url(split_url, name)}"
                )
            if name in sizes:
                found, expected = sizes[name]
                raise CorruptDataError(name, WHOLE_SHARD, _size_reason(found, expected))
        return names
    if diff.extra:
        logger.warning(
            "%s: files the manifest does not list are ignored: %s", where, diff.describe()
        )
    sizes = {name: (found, expected) for name, found, expected in diff.wrong_size}
    refused = {name: f"shard missing at {join_url(split_url, name)}" for name in diff.missing}
    refused |= {name: _size_reason(found, expected) for name, (found, expected) in sizes.items()}
    keep = []
    for name in names:
        if name not in refused:
            keep.append(name)
            continue
        (report or spec.tally.add_outcome)(*refused_shard(manifest.shard(name), refused[name]))  # type: ignore[union-attr]
    return keep


def _prepare_read(
    split_url: str,
    storage: StorageConfig | None,
    shards: Sequence[str] | None,
    on_error: OnError,
    tally: SkipTally | None,
    manifest: Manifest | None,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
) -> tuple[_Spec, list[str]]:
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error: expected 'skip' or 'fail', found {on_error!r}")
    if on_error == "skip" and tally is None:
        raise ValueError(
            "on_error='skip' needs a tally to report skipped samples to: pass "
            "tally=SkipTally.shared() (Ray) or SkipTally() (iter_split)"
        )
    split_url = split_url.rstrip("/")
    manifest = manifest or load_manifest(split_url, storage, check_shards=False)
    listed = [info.name for info in manifest.shards]
    names = list(listed) if shards is None else list(shards)
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise ValueError(
            f"no shard {unknown[0]!r} in {split_url} (it has {len(listed)}: {listed[0]}...)"
        )
    spec = _Spec(
        split_url,
        storage,
        manifest,
        on_error,
        tally,
        limits or ImageLimits(),
        retry or RetryPolicy(),
    )
    return spec, _check_shards_present(split_url, manifest, names, spec, storage)


def iter_split(
    split_url: str,
    storage: StorageConfig | None = None,
    *,
    shards: Sequence[str] | None = None,
    on_error: OnError = "fail",
    tally: SkipTally | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    manifest: Manifest | None = None,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
) -> Iterator[dict]:
    """The rows of a split (or of `shards`), in this process, without Ray (see module docstring)."""
    spec, names = _prepare_read(
        split_url, storage, shards, on_error, tally, manifest, limits, retry
    )
    if shuffle:
        np.random.default_rng(seed).shuffle(names)
    return _read_shards(spec, names, seed, shuffle)


def read_split(
    split_url: str,
    storage: StorageConfig | None = None,
    *,
    shards: Sequence[str] | None = None,
    on_error: OnError = "fail",
    tally: SkipTally | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    rows_per_block: int = 1024,
    manifest: Manifest | None = None,
    concurrency: int | None = None,
    ray_remote_args: dict[str, Any] | None = None,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Data dataset of the split's rows (see the module docstring).

    Args:
        split_url: `<out>/<split>` as written by prepare.
        shards: read only these shard names (default: all, in manifest order).
        on_error: "fail" or "skip" (then `tally` must be a `SkipTally.shared()`).
        shuffle, seed: shard order per epoch and rows within shards (see module docstring).
        rows_per_block: rows per Ray Data block emitted by a read task.
        manifest: skip loading it again when the caller has it.
        concurrency: at most this many read tasks at once (default: Ray decides).
        ray_remote_args: passed to the read tasks (num_cpus, memory, runtime_env, ...).
        limits: bounds on each image, checked before decoding (default: `ImageLimits()`).
        retry: how storage faults are retried (default: `RetryPolicy()`).
    """
    import ray.data

    from pipeline.data.ray_source import shard_datasource

    if tally is not None and not tally.is_shared:
        raise ValueError("read_split runs in Ray tasks: pass tally=SkipTally.shared()")
    spec, names = _prepare_read(
        split_url, storage, shards, on_error, tally, manifest, limits, retry
    )
    source = shard_datasource(spec, names, shuffle, seed, rows_per_block)
    return ray.data.read_datasource(
        source, concurrency=concurrency, ray_remote_args=ray_remote_args or {}
    )
