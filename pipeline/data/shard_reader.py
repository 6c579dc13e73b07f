"""Reading one shard: the tar stream, its samples, the checks against the manifest, the outcome.

The contract is `pipeline.data.reader`'s (see its docstring): bad images and shards that cannot
be read whole are skipped and reported, or raise CorruptDataError, by `on_error`; storage faults
are retried by `streams.ResumingReader` and never counted as bad data. `iter_shard` is re-exported
by `pipeline.data.reader`, where its callers find it.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pipeline.data.images import BadImage, ImageLimits, decode_image
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.data.streams import ResumingReader, RetryPolicy, TransientReadError
from pipeline.data.tally import ShardOutcome, Skipped
from pipeline.storage import StorageConfig, fsspec_filesystem

__all__ = [
    "WHOLE_SHARD",
    "Report",
    "TarSample",
    "hold_last_row",
    "iter_shard",
    "refused_shard",
    "tar_samples",
]

# The reader's logger: one place to configure what readers say.
logger = logging.getLogger("pipeline.data.reader")

OnError = Literal["skip", "fail"]
WHOLE_SHARD = "*"
Report = Callable[[ShardOutcome, Sequence[Skipped]], None]


def _corrupt(shard: str, key: str, reason: str) -> Exception:
    # CorruptDataError lives in reader.py, which imports this module: import it when needed.
    from pipeline.data.reader import CorruptDataError

    return CorruptDataError(shard, key, reason)


class _BadSample(Exception):
    """One sample cannot be used; the message says why."""


def _sample_row(
    shard: str, key: str, members: dict[str, bytes], manifest: Manifest, limits: ImageLimits
) -> dict:
    data = members.get("png")
    if data is None:
        raise _BadSample(f"no png member (found {sorted(members) or 'nothing'})")
    try:
        image = decode_image(data, manifest.shape, limits)
    except BadImage as err:
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


class _Hashing:
    """A stream that counts and hashes every byte read through it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (the tar's zero blocks and padding), so the hash covers the file."""
        while self.read(1 << 20):
            pass


class TarSample(NamedTuple):
    """One WebDataset sample: its key, the members read ({extension: bytes}), the extensions
    present but not read (not wanted), and why it is oversized ("" when it is not)."""

    key: str
    members: dict[str, bytes]
    unread: tuple[str, ...]
    oversized: str


class _EndAware(tarfile.TarInfo):
    """Headers that note how the archive ended: tarfile stops quietly at a header that is
    missing, cut short or garbage, just as at the end-of-archive zero blocks; only the latter
    means the tar was read to its end."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.flowray_end = ""  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as err:
            archive.flowray_end = f"{type(err).__name__}: {err or 'no header'}"  # type: ignore[attr-defined]
            raise


def tar_samples(
    stream: Any, max_bytes: int, wanted: Callable[[str], bool] | None = None
) -> Iterator[TarSample]:
    """The samples of a WebDataset tar stream, in order.

    WebDataset groups consecutive members by key: the member's path up to the first dot of its
    base name ("a/b/x.seg.png" -> key "a/b/x", extension "seg.png"; extensions lower-cased).
    Members whose extension `wanted` refuses are skipped unread (their bytes stream past); a
    wanted member larger than `max_bytes` (from its tar header) is not read and makes the sample
    `oversized`. Raises tarfile.TarError / EOFError on a truncated or unreadable archive,
    also one that stops at a bad or missing header instead of its end-of-archive blocks (the
    samples before it are yielded first).
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    unread: list[str] = []
    oversized = ""
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndAware) as archive:
        archive.flowray_end = "no end"  # type: ignore[attr-defined]
        for member in archive:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, extension = base.partition(".")
            extension = extension.lower()
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None:
                    yield TarSample(key, members, tuple(unread), oversized)
                key, members, unread, oversized = member_key, {}, [], ""
            if wanted is not None and not wanted(extension):
                unread.append(extension)
                continue
            if member.size > max_bytes:
                oversized = (
                    f"member {base} of {member.size:,} bytes is larger than the limit of "
                    f"{max_bytes:,} bytes (max_bytes)"
                )
                continue
            extracted = archive.extractfile(member)
            members[extension] = extracted.read() if extracted else b""
        end = archive.flowray_end  # type: ignore[attr-defined]
    if end:
        # The sample in progress may lack members that were cut off: it is not yielded.
        raise tarfile.ReadError(f"archive ends without its end-of-archive blocks ({end})")
    if key is not None:
        yield TarSample(key, members, tuple(unread), oversized)


def _tar_samples(stream: Any, max_bytes: int) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """(key, {extension: bytes}, oversized) per sample (prepared shards: every member read)."""
    for sample in tar_samples(stream, max_bytes):
        yield sample.key, sample.members, sample.oversized


@dataclass
class _ShardState:
    """What reading one shard has found so far; raises under on_error="fail"."""

    info: ShardInfo
    on_error: OnError
    rows: int = 0  # rows produced (the last one may still be held back)
    seen: int = 0  # samples met in the tar, good or bad
    last_key: str = WHOLE_SHARD
    bad: list[Skipped] = field(default_factory=list)
    reason: str = ""  # why the shard is incomplete; "" while it may be complete
    reason_key: str = WHOLE_SHARD
    transient: bool = False
    retries: int = 0

    def bad_sample(self, key: str, reason: str) -> None:
        if self.on_error == "fail":
            raise _corrupt(self.info.name, key, reason)
        logger.warning("skipped 1 sample in shard %s at key %s: %s", self.info.name, key, reason)
        self.bad.append(Skipped(self.info.name, key, reason))

    def give_up(self, key: str, reason: str) -> None:
        if self.on_error == "fail":
            raise _corrupt(self.info.name, key, reason)
        self.reason, self.reason_key = reason, key

    def outcome(self, handed: int) -> tuple[ShardOutcome, list[Skipped]]:
        info, records = self.info, list(self.bad)
        complete = not self.reason
        if not complete:
            lost = info.count - handed - len(self.bad)
            logger.warning(
                "left out shard %s (%d of %d samples not read, at key %s): %s",
                info.name,
                lost,
                info.count,
                self.reason_key,
                self.reason,
            )
            records.append(Skipped(info.name, self.reason_key, self.reason, max(lost, 0)))
        outcome = ShardOutcome(
            shard=info.name,
            expected=info.count,
            rows=handed,
            complete=complete,
            reason=self.reason,
            skipped_keys=tuple(r.key for r in self.bad),
            retries=self.retries,
            transient=self.transient,
        )
        return outcome, records


def _open_shard(fs: Any, path: str, url: str, state: _ShardState, retry: RetryPolicy) -> Any:
    """The shard's stream, or None when it cannot be read at all (state says why)."""
    try:
        stream = ResumingReader(fs, path, retry, what=url)
    except FileNotFoundError:
        state.give_up(WHOLE_SHARD, f"shard missing at {url}")
        return None
    except TransientReadError as err:
        if state.on_error == "fail":
            raise
        state.give_up(WHOLE_SHARD, str(err))
        state.transient = True
        return None
    if stream.size != state.info.bytes:
        stream.close()
        state.give_up(
            WHOLE_SHARD,
            f"shard has {stream.size:,} bytes, manifest says {state.info.bytes:,} "
            "(truncated or replaced)",
        )
        return None
    return stream


def _shard_rows(
    url: str,
    manifest: Manifest,
    storage: StorageConfig | None,
    state: _ShardState,
    limits: ImageLimits,
    retry: RetryPolicy,
) -> Iterator[dict]:
    """The good rows of one shard; what goes wrong ends up in `state`."""
    info = state.info
    fs, path = fsspec_filesystem(url, storage)
    stream = _open_shard(fs, path, url, state, retry)
    if stream is None:
        return
    with stream:
        hashing = _Hashing(stream)
        try:
            for key, members, oversized in _tar_samples(hashing, limits.max_bytes):
                state.seen += 1
                state.last_key = key
                if state.seen > info.count:
                    state.give_up(
                        key, f"holds more samples than the {info.count} its manifest lists"
                    )
                    return
                if oversized:
                    state.bad_sample(key, oversized)
                    continue
                try:
                    row = _sample_row(info.name, key, members, manifest, limits)
                except _BadSample as err:
                    state.bad_sample(key, str(err))
                    continue
                state.rows += 1
                yield row
            hashing.drain()
        except TransientReadError as err:
            state.retries = stream.retries
            if state.on_error == "fail":
                raise
            state.give_up(state.last_key, str(err))
            state.transient = True
            return
        except FileNotFoundError:
            state.give_up(state.last_key, f"shard deleted at {url} while it was read")
            return
        except (tarfile.TarError, EOFError) as err:
            state.give_up(state.last_key, f"unreadable tar after {state.seen} samples ({err})")
            return
        state.retries = stream.retries
    if state.seen < info.count:
        state.give_up(
            state.last_key, f"shard holds {state.seen} samples, manifest says {info.count}"
        )
    elif hashing.digest.hexdigest() != info.sha256:
        state.give_up(
            WHOLE_SHARD,
            f"sha256 {hashing.digest.hexdigest()[:12]}... differs from the manifest's "
            f"{info.sha256[:12]}... (the file changed after prepare)",
        )


def iter_shard(
    shard_url: str,
    info: ShardInfo,
    manifest: Manifest,
    storage: StorageConfig | None = None,
    *,
    on_error: OnError = "fail",
    problems: list[Skipped] | None = None,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
    report: Report | None = None,
    mark_last: bool = False,
) -> Iterator[dict]:
    """Rows of one shard (the shared decode path of both readers; see the module docstring).

    Under "skip", problems are logged, appended to `problems`, and `report(outcome, records)` is
    called once the shard has been read to its end, before its last row is handed on; under
    "fail" the first problem raises CorruptDataError (TransientReadError for storage failures).
    `mark_last` adds `shard_rows` to every row (see `hold_last_row`).
    """
    state = _ShardState(info, on_error)
    rows = _shard_rows(
        shard_url, manifest, storage, state, limits or ImageLimits(), retry or RetryPolicy()
    )
    yield from hold_last_row(rows, state, problems, report, mark_last)


def hold_last_row(
    rows: Iterator[dict],
    state: Any,
    problems: list[Skipped] | None,
    report: Report | None,
    mark_last: bool = False,
) -> Iterator[dict]:
    """`rows` of one shard, the last held back until the shard's outcome is reported.

    `state` is what reading found (`.rows`, `.reason`, `.outcome(handed)`); the last row is
    handed on only when the shard is complete, so a consumer holding all of a shard's rows knows
    it was read whole. With `mark_last`, every row carries `shard_rows`: -1, except the last of a
    complete shard, where it is the number of rows the shard handed on (an in-band end marker
    for consumers that cannot ask the tally, such as a Ray Data pipeline).
    """
    held = None
    for row in rows:
        if held is not None:
            yield held
        if mark_last:
            row["shard_rows"] = -1
        held = row
    complete = not state.reason
    handed = state.rows - (1 if held is not None and not complete else 0)
    outcome, records = state.outcome(handed)
    if problems is not None:
        problems.extend(records)
    if report is not None:
        report(outcome, records)
    if held is not None and complete:
        if mark_last:
            held["shard_rows"] = handed
        yield held


def refused_shard(info: ShardInfo, reason: str) -> tuple[ShardOutcome, list[Skipped]]:
    """The outcome of a shard left out before reading (missing, another size), under "skip"."""
    state = _ShardState(info, "skip")
    state.give_up(WHOLE_SHARD, reason)
    return state.outcome(handed=0)
