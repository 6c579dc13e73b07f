"""Read a prepared split as rows: a streaming Ray Data dataset, or a plain iterator; one decode path.

    from pipeline.data.reader import SkipTally, iter_split, read_split

    ds = read_split("s3://data/fmnist/train", storage)            # ray.data.Dataset, lazy
    for batch in ds.iter_batches(batch_size=256): ...

    tally = SkipTally.shared()                                     # a Ray actor; see below
    ds = read_split(url, storage, on_error="skip", tally=tally)
    ...consume ds (here, or in Ray Train workers)...
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

Corrupt data, under `on_error`:
    undecodable PNG, wrong mode or size, a sample without a PNG, a bad `cls`:  one sample
    truncated or unreadable tar, fewer samples than the manifest says:     the samples lost
    missing shard:                                                         all its samples
"fail" raises `CorruptDataError` naming the shard and key ("*" for a whole shard); through Ray it
arrives as RayTaskError(CorruptDataError), an instance of both, so `except CorruptDataError` works
in the driver. "skip" logs a
warning with shard and key (logger `pipeline.data.reader`), counts the lost samples and goes on.

Where skip counts go: a `SkipTally`. `SkipTally()` lives in this process (for `iter_split`);
`SkipTally.shared()` is backed by a small Ray actor (num_cpus=0) that read tasks on any node report
to, once per shard with problems, and wait for, so that when iteration has finished every skip is in
the tally. `read_split` accepts only a shared tally. After the job: `total()` (samples lost),
`by_shard()` ({shard: samples lost}), `records()` (the first 1000 `Skipped(shard, key, reason,
count)`), `summary()` (one line for the job's report). A tally is required with on_error="skip".

A manifest that disagrees with the split (a shard file it does not list) is a `ManifestError` when
the dataset is created; a missing listed shard under "fail" is a `CorruptDataError` then too.
"""

from __future__ import annotations

import functools
import io
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.data.shards import Manifest, ManifestError, ShardInfo, compare_shards, load_manifest
from pipeline.errors import FlowrayError
from pipeline.storage import StorageConfig, fsspec_filesystem, join_url, list_files

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "COLUMNS",
    "CorruptDataError",
    "SkipTally",
    "Skipped",
    "decode_image",
    "iter_shard",
    "iter_split",
    "read_split",
]

logger = logging.getLogger(__name__)

OnError = Literal["skip", "fail"]
COLUMNS = ("key", "shard", "image", "label", "nbytes")
WHOLE_SHARD = "*"
_MAX_RECORDS = 1000


class CorruptDataError(FlowrayError, RuntimeError):
    """A sample or shard cannot be read (on_error="fail"); names the shard and the key."""

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


@dataclass(frozen=True)
class Skipped:
    """Samples skipped under on_error="skip": `count` samples at `key` ("*": a whole shard)."""

    shard: str
    key: str
    reason: str
    count: int = 1


# ----------------------------------------------------------------------------- tally


class _Counts:
    """The tally's state; held in this process or inside the Ray actor."""

    def __init__(self) -> None:
        self.records: list[Skipped] = []
        self.per_shard: dict[str, int] = {}

    def add(self, records: list[Skipped]) -> None:
        for record in records:
            self.per_shard[record.shard] = self.per_shard.get(record.shard, 0) + record.count
            if len(self.records) < _MAX_RECORDS:
                self.records.append(record)

    def state(self) -> tuple[list[Skipped], dict[str, int]]:
        return list(self.records), dict(self.per_shard)


@functools.cache
def _tally_actor_class() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_Counts)


class SkipTally:
    """Counts of samples skipped by readers under on_error="skip" (see the module docstring)."""

    def __init__(self) -> None:
        self._local: _Counts | None = _Counts()
        self._actor: Any = None

    @classmethod
    def shared(cls) -> SkipTally:
        """A tally backed by a Ray actor, for readers running in Ray tasks (Ray must be up)."""
        tally = cls()
        tally._local = None
        tally._actor = _tally_actor_class().remote()
        return tally

    @property
    def is_shared(self) -> bool:
        return self._actor is not None

    def add(self, records: list[Skipped]) -> None:
        if not records:
            return
        if self._actor is None:
            self._local.add(records)  # type: ignore[union-attr]
        else:
            import ray

            # Wait for it: once a read task has finished, its skips must be visible.
            ray.get(self._actor.add.remote(records))

    def _state(self) -> tuple[list[Skipped], dict[str, int]]:
        if self._actor is None:
            return self._local.state()  # type: ignore[union-attr]
        import ray

        return ray.get(self._actor.state.remote())

    def total(self) -> int:
        return sum(self._state()[1].values())

    def by_shard(self) -> dict[str, int]:
        return dict(sorted(self._state()[1].items()))

    def records(self) -> list[Skipped]:
        return self._state()[0]

    def summary(self) -> str:
        per_shard = self.by_shard()
        if not per_shard:
            return "skipped 0 samples"
        shards = ", ".join(f"{name}: {count}" for name, count in per_shard.items())
        return f"skipped {sum(per_shard.values())} samples ({shards})"

    def __reduce__(self) -> tuple[Any, ...]:
        if self._actor is None:
            # A copy in another process would count there and report nothing here.
            raise TypeError(
                "a local SkipTally cannot be sent to other processes; use SkipTally.shared()"
            )
        return (_shared_tally, (self._actor,))


def _shared_tally(actor: Any) -> SkipTally:
    tally = SkipTally()
    tally._local, tally._actor = None, actor
    return tally


# ----------------------------------------------------------------------------- decoding


class _BadSample(Exception):
    """One sample cannot be used; the message says why."""


def decode_image(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """PNG bytes as uint8 [C, H, W], checked against `shape` (mode L for C=1, RGB for C=3).

    Raises:
        ValueError: the bytes are not an image, or its mode or size differ from `shape`.
    """
    from PIL import Image

    channels, height, width = shape
    want_mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, size = image.mode, image.size
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image: {err}") from err
    if mode != want_mode:
        raise ValueError(f"image mode {mode}, expected {want_mode} for {channels} channel(s)")
    if size != (width, height):
        raise ValueError(f"image size {size[1]}x{size[0]}, expected {height}x{width} (HxW)")
    if channels == 1:
        return array[None].copy()  # (H, W) -> (1, H, W)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def _sample_row(shard: str, key: str, members: dict[str, bytes], manifest: Manifest) -> dict:
    data = members.get("png")
    if data is None:
        raise _BadSample(f"no png member (found {sorted(members) or 'nothing'})")
    try:
        image = decode_image(data, manifest.shape)
    except ValueError as err:
        raise _BadSample(str(err)) from err
    label = -1
    if "cls" in members:
        try:
            label = int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as err:
            raise _BadSample(f"bad cls {members['cls'][:20]!r}") from err
    elif manifest.has_labels:
        raise _BadSample("no cls member in a labelled split")
    return {"key": key, "shard": shard, "image": image, "label": label, "nbytes": len(data)}


def _tar_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar stream, in order.

    WebDataset groups consecutive members by the name up to the first dot of the base name.
    Raises tarfile.TarError / EOFError / OSError on a truncated or unreadable archive.
    """
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, extension = base.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            extracted = archive.extractfile(member)
            members[extension.lower()] = extracted.read() if extracted else b""
    if key is not None:
        yield key, members


def iter_shard(
    shard_url: str,
    info: ShardInfo,
    manifest: Manifest,
    storage: StorageConfig | None = None,
    *,
    on_error: OnError = "fail",
    problems: list[Skipped] | None = None,
) -> Iterator[dict]:
    """Rows of one shard (the shared decode path of both readers).

    Under "skip", problems are logged and appended to `problems` (the caller reports them to its
    tally); under "fail" the first one raises CorruptDataError.
    """
    shard = info.name
    seen = 0  # samples read from the tar, good or bad
    last_key = WHOLE_SHARD

    def problem(key: str, reason: str, count: int = 1) -> None:
        if on_error == "fail":
            raise CorruptDataError(shard, key, reason)
        logger.warning("skipped %d sample(s) in shard %s at key %s: %s", count, shard, key, reason)
        if problems is not None:
            problems.append(Skipped(shard, key, reason, count))

    fs, path = fsspec_filesystem(shard_url, storage)
    try:
        stream = fs.open(path, "rb", block_size=8 << 20) if fs.exists(path) else None
    except FileNotFoundError:
        stream = None
    if stream is None:
        problem(WHOLE_SHARD, f"shard missing at {shard_url}", info.count)
        return
    try:
        with stream:
            for key, members in _tar_samples(stream):
                seen += 1
                last_key = key
                try:
                    row = _sample_row(shard, key, members, manifest)
                except _BadSample as err:
                    problem(key, str(err))
                    continue
                yield row
    except (tarfile.TarError, EOFError, OSError) as err:
        lost = max(info.count - seen, 1)
        problem(last_key, f"unreadable tar after {seen} samples ({err}); {lost} lost", lost)
        return
    if seen < info.count:
        problem(
            last_key, f"shard holds {seen} samples, manifest says {info.count}", info.count - seen
        )


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class _Spec:
    """Everything a read task needs (picklable; the storage config holds no credentials)."""

    split_url: str
    storage: StorageConfig | None
    manifest: Manifest
    on_error: OnError
    tally: SkipTally | None


def _read_shards(
    spec: _Spec, names: Sequence[str], seed: int | None, shuffle: bool
) -> Iterator[dict]:
    rng = np.random.default_rng(seed) if shuffle else None
    for name in names:
        problems: list[Skipped] = []
        rows = iter_shard(
            join_url(spec.split_url, name),
            spec.manifest.shard(name),
            spec.manifest,
            spec.storage,
            on_error=spec.on_error,
            problems=problems,
        )
        if rng is not None:
            buffered = list(rows)  # one shard: bounded by prepare's shard size
            yield from (buffered[i] for i in rng.permutation(len(buffered)))
        else:
            yield from rows
        if problems and spec.tally is not None:
            spec.tally.add(problems)


def _prepare_read(
    split_url: str,
    storage: StorageConfig | None,
    shards: Sequence[str] | None,
    on_error: OnError,
    tally: SkipTally | None,
    manifest: Manifest | None,
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
    diff = compare_shards(manifest, list_files(split_url, storage))
    if diff.extra:
        raise ManifestError(
            f"{join_url(split_url, 'manifest.json')} disagrees with the shards present: "
            f"{diff.describe()}",
            hint="a prefix holds one prepared split; rerun prepare into a new --out",
        )
    listed = [info.name for info in manifest.shards]
    names = list(listed) if shards is None else list(shards)
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise ValueError(
            f"no shard {unknown[0]!r} in {split_url} (it has {len(listed)}: {listed[0]}...)"
        )
    if on_error == "fail":
        for name in names:
            if name in diff.missing:
                raise CorruptDataError(
                    name, WHOLE_SHARD, f"shard missing at {join_url(split_url, name)}"
                )
    return _Spec(split_url, storage, manifest, on_error, tally), names


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
) -> Iterator[dict]:
    """The rows of a split (or of `shards`), in this process, without Ray (see module docstring)."""
    spec, names = _prepare_read(split_url, storage, shards, on_error, tally, manifest)
    if shuffle:
        np.random.default_rng(seed).shuffle(names)
    return _read_shards(spec, names, seed, shuffle)


def _rows_to_block(rows: list[dict]) -> Any:
    from ray.data.block import BlockAccessor

    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "shard": np.array([r["shard"] for r in rows], dtype=object),
        "image": np.stack([r["image"] for r in rows]),  # (n, C, H, W)
        "label": np.array([r["label"] for r in rows], dtype=np.int64),
        "nbytes": np.array([r["nbytes"] for r in rows], dtype=np.int64),
    }
    return BlockAccessor.batch_to_block(batch)


def _read_task(spec: _Spec, names: list[str], seed: int | None, shuffle: bool, rows_per_block: int):
    rows: list[dict] = []
    for row in _read_shards(spec, names, seed, shuffle):
        rows.append(row)
        if len(rows) == rows_per_block:
            yield _rows_to_block(rows)
            rows = []
    if rows:
        yield _rows_to_block(rows)


def _datasource(
    spec: _Spec, names: list[str], shuffle: bool, seed: int | None, rows_per_block: int
) -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    image_bytes = int(np.prod(spec.manifest.shape))

    class ShardDatasource(Datasource):
        """One read task per group of shards; shard order reshuffled at every execution."""

        def __init__(self) -> None:
            super().__init__()
            self._executions = 0

        def get_name(self) -> str:
            return "FlowrayShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(spec.manifest.shard(n).count for n in names) * (image_bytes + 64)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            order = list(names)
            task_seed = None
            if shuffle:
                # A new permutation per execution (epoch); reproducible when a seed is given.
                task_seed = None if seed is None else seed + self._executions
                np.random.default_rng(task_seed).shuffle(order)
            self._executions += 1
            groups = [
                g
                for g in np.array_split(
                    np.array(order, dtype=object), max(1, min(parallelism, len(order)))
                )
                if len(g)
            ]
            tasks = []
            for i, group in enumerate(groups):
                group_names = [str(n) for n in group]
                count = sum(spec.manifest.shard(n).count for n in group_names)
                metadata = BlockMetadata(
                    num_rows=count,
                    size_bytes=count * (image_bytes + 64),
                    input_files=[join_url(spec.split_url, n) for n in group_names],
                    exec_stats=None,
                )
                group_seed = None if task_seed is None else task_seed * 100_003 + i
                read = functools.partial(
                    _read_task, spec, group_names, group_seed, shuffle, rows_per_block
                )
                tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
            return tasks

    return ShardDatasource()


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
    """
    import ray.data

    if tally is not None and not tally.is_shared:
        raise ValueError("read_split runs in Ray tasks: pass tally=SkipTally.shared()")
    spec, names = _prepare_read(split_url, storage, shards, on_error, tally, manifest)
    source = _datasource(spec, names, shuffle, seed, rows_per_block)
    return ray.data.read_datasource(
        source, concurrency=concurrency, ray_remote_args=ray_remote_args or {}
    )
