"""Read any input (a prepared split or foreign WebDataset shards) as rows of one schema.

    from pipeline.data.input_reader import iter_input, read_input
    from pipeline.data.inputs import resolve_input

    plan = resolve_input("s3://bucket/photos/{000000..004999}.tar", storage)   # listed once
    ds = read_input(plan, storage, shape=(3, 64, 64), on_error="skip", tally=SkipTally.shared())
    for row in iter_input(plan, storage, shape=(3, 64, 64)): ...               # same rows, no Ray

`read_split`/`iter_split` (pipeline.data.reader) stay as they were for prepared splits; these two
take either kind, with the model's shape as a parameter: a prepared split must hold that shape
(InputError otherwise); foreign shards are decoded and fitted to it in the read tasks
(pipeline.data.foreign). Rows, the same from both kinds and both functions (INPUT_COLUMNS):

    key: str            the image's key: the tar's `__key__` (prepared: "<split>-<index>")
    shard: str          the shard's URL (prepared too: `<split url>/shard-000000.tar`)
    image: uint8 ndarray [C, H, W] = `shape`
    label: int          `cls`, -1 without
    nbytes: int         length of the encoded image member
    orig_width, orig_height: int   size before fitting; -1 for prepared shards (prepare fitted
                        them, and the manifest does not keep the original sizes)
    shard_rows: int     -1, except on the last row of a complete shard: the rows that shard
                        handed on. A consumer that holds that many rows of a shard holds all of
                        them, whatever order a pipeline delivered them in.

Outcomes (`ShardOutcome`) and skip records go to the tally keyed by shard URL for both kinds,
with the version read (`ShardOutcome.version`). `shards=[urls]` reads a subset of the plan (a
scoring run reads only the shards without output). For prepared plans the manifest is compared
with the plan's listing (no second listing) as `read_split` does: under "fail" a missing or
resized shard raises before any work, under "skip" it is reported as left out. Missing shards
of a foreign pattern or list (`plan.missing`) are the same: CorruptDataError under "fail",
left out under "skip". Shuffling is `read_split`'s: shard order per execution, rows within a
shard (a foreign shard's decoded rows are buffered: count x C x H x W bytes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.data.foreign import FOREIGN_COLUMNS, IMAGE_MEMBERS, ForeignRead, iter_foreign_shard
from pipeline.data.images import ImageLimits
from pipeline.data.inputs import InputError, InputPlan, ShardRef, resolve_input
from pipeline.data.shard_reader import WHOLE_SHARD, iter_shard
from pipeline.data.streams import RetryPolicy
from pipeline.data.tally import ShardOutcome, Skipped, SkipTally
from pipeline.storage import StorageConfig

if TYPE_CHECKING:
    import ray.data

__all__ = ["INPUT_COLUMNS", "iter_input", "read_input"]

OnError = Literal["skip", "fail"]
INPUT_COLUMNS = FOREIGN_COLUMNS


@dataclass(frozen=True)
class _InputRead:
    """Everything a read task needs (picklable): the plan's shards by URL and how to read."""

    plan: InputPlan  # trimmed to the shards to read
    read: ForeignRead
    tally: SkipTally | None
    refs: dict[str, ShardRef] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refs.update(self.plan.by_url())

    def ref(self, url: str) -> ShardRef:
        return self.refs[url]


def _rekeyed(tally: SkipTally | None, ref: ShardRef) -> Any:
    """A report function that files a prepared shard's outcome under its URL and version."""
    if tally is None:
        return None

    def report(outcome: ShardOutcome, records: Sequence[Skipped]) -> None:
        outcome = dataclasses.replace(outcome, shard=ref.url, version=ref.version)
        tally.add_outcome(outcome, [dataclasses.replace(r, shard=ref.url) for r in records])

    return report


def _prepared_rows(spec: _InputRead, ref: ShardRef) -> Iterator[dict]:
    read, manifest = spec.read, spec.plan.manifest
    assert manifest is not None
    rows = iter_shard(
        ref.url,
        manifest.shard(ref.name),
        manifest,
        read.storage,
        on_error=read.on_error,
        limits=read.limits,
        retry=read.retry,
        report=_rekeyed(spec.tally, ref),
        mark_last=True,
    )
    for row in rows:
        # Same columns, same order as foreign rows.
        yield {
            "key": row["key"],
            "shard": ref.url,
            "image": row["image"],
            "label": row["label"],
            "nbytes": row["nbytes"],
            "orig_width": -1,
            "orig_height": -1,
            "shard_rows": row["shard_rows"],
        }


def _shard_rows(spec: _InputRead, url: str) -> Iterator[dict]:
    ref = spec.ref(url)
    if spec.plan.is_prepared:
        return _prepared_rows(spec, ref)
    report = spec.tally.add_outcome if spec.tally is not None else None
    return iter_foreign_shard(ref, spec.read, report=report)


def _read_urls(
    spec: _InputRead, urls: Sequence[str], seed: int | None, shuffle: bool
) -> Iterator[dict]:
    rng = np.random.default_rng(seed) if shuffle else None
    for url in urls:
        rows = _shard_rows(spec, url)
        if rng is not None:
            buffered = list(rows)  # one shard's decoded rows
            yield from (buffered[i] for i in rng.permutation(len(buffered)))
        else:
            yield from rows


def _missing(plan: InputPlan, on_error: OnError, tally: SkipTally | None) -> None:
    """Shards a pattern or list named that do not exist: raise, or report them left out."""
    from pipeline.data.reader import CorruptDataError

    for url in plan.missing:
        reason = f"shard missing at {url} (named by {plan.spec})"
        if on_error == "fail":
            raise CorruptDataError(url, WHOLE_SHARD, reason)
        outcome = ShardOutcome(shard=url, expected=0, rows=0, complete=False, reason=reason)
        tally.add_outcome(outcome, [Skipped(url, WHOLE_SHARD, reason, 0)])  # type: ignore[union-attr]


def _present_prepared(
    plan: InputPlan, refs: list[ShardRef], read: ForeignRead, tally: SkipTally | None
) -> list[ShardRef]:
    """`refs` less the prepared shards the plan's listing shows missing or resized (reader.py's
    checks, against the listing the plan made)."""
    from pipeline.data.reader import _check_shards_present, _Spec

    manifest = plan.manifest
    assert manifest is not None
    if tuple(manifest.shape) != read.shape:
        raise InputError(
            f"{plan.spec} holds images of shape {list(manifest.shape)} (C, H, W), expected "
            f"{list(read.shape)}",
            hint="read it with a model of that shape, or prepare the data at the model's size",
        )
    files = {r.name: r.size for r in plan.shards if r.size >= 0} | {n: 0 for n in plan.extra}
    by_name = {r.name: r for r in plan.shards}

    def report(outcome: ShardOutcome, records: Sequence[Skipped]) -> None:
        _rekeyed(tally, by_name[outcome.shard])(outcome, records)

    spec = _Spec(plan.root, read.storage, manifest, read.on_error, tally, read.limits, read.retry)
    names = [r.name for r in refs]
    kept = _check_shards_present(plan.root, manifest, names, spec, read.storage, files, report)
    return [by_name[n] for n in kept]


def _prepare(
    source: str | InputPlan,
    storage: StorageConfig | None,
    shards: Sequence[str] | None,
    read: ForeignRead,
    tally: SkipTally | None,
) -> _InputRead:
    if read.on_error == "skip" and tally is None:
        raise ValueError(
            "on_error='skip' needs a tally to report skipped samples to: pass "
            "tally=SkipTally.shared() (Ray) or SkipTally() (iter_input)"
        )
    plan = source if isinstance(source, InputPlan) else resolve_input(source, storage)
    by_url = plan.by_url()
    if shards is None:
        refs = list(plan.shards)
        _missing(plan, read.on_error, tally)
    else:
        unknown = [u for u in shards if u not in by_url]
        if unknown:
            raise ValueError(
                f"no shard {unknown[0]!r} in {plan.spec} (it has {len(plan.shards)}: "
                f"{plan.shards[0].url}...)"
            )
        refs = [by_url[u] for u in shards]
    if plan.is_prepared:
        refs = _present_prepared(plan, refs, read, tally)
    return _InputRead(dataclasses.replace(plan, shards=tuple(refs)), read, tally)


def _options(
    storage: StorageConfig | None,
    shape: tuple[int, int, int],
    on_error: OnError,
    limits: ImageLimits | None,
    retry: RetryPolicy | None,
    image_members: Sequence[str],
) -> ForeignRead:
    return ForeignRead(
        tuple(shape),  # type: ignore[arg-type]
        storage,
        on_error,
        limits or ImageLimits(),
        retry or RetryPolicy(),
        tuple(image_members),
    )


def iter_input(
    source: str | InputPlan,
    storage: StorageConfig | None = None,
    *,
    shape: tuple[int, int, int],
    shards: Sequence[str] | None = None,
    on_error: OnError = "fail",
    tally: SkipTally | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
    image_members: Sequence[str] = IMAGE_MEMBERS,
) -> Iterator[dict]:
    """The rows of an input (a spec, resolved here, or a plan), in this process, without Ray
    (see the module docstring). `shards`: URLs of the plan's shards to read (default: all)."""
    read = _options(storage, shape, on_error, limits, retry, image_members)
    spec = _prepare(source, storage, shards, read, tally)
    urls = [ref.url for ref in spec.plan.shards]
    if shuffle:
        np.random.default_rng(seed).shuffle(urls)
    return _read_urls(spec, urls, seed, shuffle)


def read_input(
    source: str | InputPlan,
    storage: StorageConfig | None = None,
    *,
    shape: tuple[int, int, int],
    shards: Sequence[str] | None = None,
    on_error: OnError = "fail",
    tally: SkipTally | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    rows_per_block: int = 1024,
    concurrency: int | None = None,
    ray_remote_args: dict[str, Any] | None = None,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
    image_members: Sequence[str] = IMAGE_MEMBERS,
    epoch_of: Callable[[], int] | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Data dataset of an input's rows (see the module docstring); the arguments
    are `iter_input`'s and `read_split`'s. Decoding and fitting happen in the read tasks.
    `epoch_of`: where a shuffled read gets its epoch (`ray_source.tasks_datasource`)."""
    import ray.data

    from pipeline.data.ray_source import TaskPlan, tasks_datasource

    if tally is not None and not tally.is_shared:
        raise ValueError("read_input runs in Ray tasks: pass tally=SkipTally.shared()")
    read = _options(storage, shape, on_error, limits, retry, image_members)
    spec = _prepare(source, storage, shards, read, tally)
    refs = spec.plan.shards
    manifest = spec.plan.manifest
    counts = {i.name: i.count for i in manifest.shards} if manifest is not None else {}
    plan = TaskPlan(
        name="FlowrayInput",
        ids=[r.url for r in refs],
        urls=[r.url for r in refs],
        rows=[counts.get(r.name) for r in refs],
        bytes_per_row=int(np.prod(read.shape)),
        read=functools.partial(_read_urls, spec),
    )
    return ray.data.read_datasource(
        tasks_datasource(plan, shuffle, seed, rows_per_block, epoch_of),
        concurrency=concurrency,
        ray_remote_args=ray_remote_args or {},
    )
