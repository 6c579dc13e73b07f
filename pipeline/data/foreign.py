"""Reading foreign WebDataset shards in place: any tool's tars, decoded and fitted to a shape.

    read = ForeignRead(shape=(3, 64, 64), storage=storage, on_error="skip", tally=tally)
    for row in iter_foreign_shard(plan.shards[0], read): ...

The standard WebDataset conventions (webdataset 1.0.2, Ray Data's read_webdataset): a sample is
the run of consecutive members sharing a key, the member's path up to the first dot of its base
name; the extension is the rest, lower-cased. The image is the member whose extension is the
first of `image_members` present (default jpg, jpeg, png, webp); `cls` holds the label in decimal
(-1 without one); every other member (`json`, `txt`, embeddings, ...) is tolerated and not read.

Rows (one per decodable image):
    key: str            the sample's key as the tar has it (`__key__`)
    shard: str          the shard's URL
    image: uint8 ndarray [C, H, W], the target `shape`, fitted by `images.decode_fitted` (the
                        rules `prepare` uses: so a prepared and an in-place read of the same
                        bytes give the same pixels)
    label: int          from `cls`, -1 without
    nbytes: int         length of the encoded image member
    orig_width, orig_height: int   the image's size before fitting (upright)
    shard_rows: int     -1, except on the last row of a complete shard: the rows it handed on

Nothing needs a manifest: counts are discovered while reading, and a shard is complete when its
tar has been read to its end. Bad samples (an image member that does not decode or breaks the
`limits`, checked from the tar header and the image header before decoding; no image member; a
bad `cls`; a key met twice in one shard) are skipped and reported with shard URL and key under
"skip", or raise CorruptDataError under "fail", exactly as for prepared shards; so are shards
that cannot be read whole (missing, an unreadable or truncated tar). A shard whose size or
version at open differs from the listing's changed after it was listed: it is left out as
`transient` (a rerun, listing again, reads it). Storage faults are retried by
`streams.ResumingReader` and never counted as bad data. Outcomes go to `report` (a tally),
keyed by shard URL; `ShardOutcome.expected` is the samples met, `version` the version read.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.data.images import BadImage, FittedImage, ImageLimits, decode_fitted
from pipeline.data.inputs import ShardRef, version_of
from pipeline.data.shard_reader import WHOLE_SHARD, Report, hold_last_row, tar_samples
from pipeline.data.streams import ResumingReader, RetryPolicy, TransientReadError
from pipeline.data.tally import ShardOutcome, Skipped
from pipeline.storage import StorageConfig, fsspec_filesystem

__all__ = [
    "FOREIGN_COLUMNS",
    "IMAGE_MEMBERS",
    "ForeignRead",
    "fetch_images",
    "iter_foreign_shard",
]

logger = logging.getLogger("pipeline.data.reader")

OnError = Literal["skip", "fail"]
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
FOREIGN_COLUMNS = (
    "key",
    "shard",
    "image",
    "label",
    "nbytes",
    "orig_width",
    "orig_height",
    "shard_rows",
)


@dataclass(frozen=True)
class ForeignRead:
    """How to read foreign shards (picklable: sent to Ray read tasks).

    Attributes:
        shape: (C, H, W) every image is fitted to; C is 1 or 3.
        image_members: extensions taken as the image, in order of preference.
    """

    shape: tuple[int, int, int]
    storage: StorageConfig | None = None
    on_error: OnError = "fail"
    limits: ImageLimits = ImageLimits()
    retry: RetryPolicy = RetryPolicy()
    image_members: tuple[str, ...] = IMAGE_MEMBERS

    def __post_init__(self) -> None:
        channels, height, width = self.shape
        if channels not in (1, 3) or min(height, width) < 1:
            raise ValueError(f"shape: expected (C, H, W) with C in 1, 3, found {self.shape}")
        if not self.image_members:
            raise ValueError("image_members: expected at least one extension, found none")
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error: expected 'skip' or 'fail', found {self.on_error!r}")
        lowered = tuple(m.lower().lstrip(".") for m in self.image_members)
        object.__setattr__(self, "image_members", lowered)


def _corrupt(shard: str, key: str, reason: str) -> Exception:
    from pipeline.data.reader import CorruptDataError

    return CorruptDataError(shard, key, reason)


class _BadSample(Exception):
    """One sample cannot be used; the message says why."""


@dataclass
class _ForeignState:
    """What reading one foreign shard has found so far; raises under on_error="fail"."""

    url: str
    on_error: OnError
    rows: int = 0
    seen: int = 0
    last_key: str = WHOLE_SHARD
    bad: list[Skipped] = field(default_factory=list)
    reason: str = ""
    reason_key: str = WHOLE_SHARD
    transient: bool = False
    retries: int = 0
    version: str = ""

    def bad_sample(self, key: str, reason: str) -> None:
        if self.on_error == "fail":
            raise _corrupt(self.url, key, reason)
        logger.warning("skipped 1 sample in shard %s at key %s: %s", self.url, key, reason)
        self.bad.append(Skipped(self.url, key, reason))

    def give_up(self, key: str, reason: str, transient: bool = False) -> None:
        if self.on_error == "fail" and transient:
            raise TransientReadError(
                f"{self.url}: {reason}", hint="the data is not known to be bad; rerun the job"
            )
        if self.on_error == "fail":
            raise _corrupt(self.url, key, reason)
        self.reason, self.reason_key, self.transient = reason, key, transient

    def outcome(self, handed: int) -> tuple[ShardOutcome, list[Skipped]]:
        records = list(self.bad)
        complete = not self.reason
        if not complete:
            # Samples met but not handed on; how many the rest of the tar held is unknown.
            lost = max(self.seen - handed - len(self.bad), 0)
            logger.warning(
                "left out shard %s (after %d samples, at key %s): %s",
                self.url,
                self.seen,
                self.reason_key,
                self.reason,
            )
            records.append(Skipped(self.url, self.reason_key, self.reason, lost))
        outcome = ShardOutcome(
            shard=self.url,
            expected=self.seen,
            rows=handed,
            complete=complete,
            reason=self.reason,
            skipped_keys=tuple(r.key for r in self.bad),
            retries=self.retries,
            transient=self.transient,
            version=self.version,
        )
        return outcome, records


def _label(members: dict[str, bytes]) -> int:
    if "cls" not in members:
        return -1
    try:
        return int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise _BadSample(f"bad cls {members['cls'][:20]!r}") from err


def _sample_row(url: str, sample: Any, read: ForeignRead) -> dict:
    chosen = next((ext for ext in read.image_members if ext in sample.members), None)
    if chosen is None:
        found = sorted([*sample.members, *sample.unread]) or ["nothing"]
        raise _BadSample(
            f"no image member: expected one of {', '.join(read.image_members)}, found "
            f"{', '.join(found)}"
        )
    data = sample.members[chosen]
    channels, height, width = read.shape
    try:
        fitted = decode_fitted(data, channels, (height, width), read.limits)
    except BadImage as err:
        raise _BadSample(f"{chosen}: {err}") from err
    return {
        "key": sample.key,
        "shard": url,
        "image": fitted.pixels,
        "label": _label(sample.members),
        "nbytes": len(data),
        "orig_width": fitted.width,
        "orig_height": fitted.height,
    }


def _open(ref: ShardRef, read: ForeignRead, state: _ForeignState) -> ResumingReader | None:
    """The shard's stream, or None when it cannot be read as listed (state says why)."""
    fs, path = fsspec_filesystem(ref.url, read.storage)
    try:
        stream = ResumingReader(fs, path, read.retry, what=ref.url)
    except FileNotFoundError:
        state.give_up(WHOLE_SHARD, f"shard missing at {ref.url} (deleted after it was listed)")
        return None
    except TransientReadError as err:
        if read.on_error == "fail":
            raise
        state.give_up(WHOLE_SHARD, str(err), transient=True)
        return None
    state.version = version_of(stream.info)
    if stream.size != ref.size or (ref.version and state.version != ref.version):
        stream.close()
        # Rewritten between the listing and now: what was planned is not what is there.
        state.give_up(
            WHOLE_SHARD,
            f"shard changed after it was listed ({stream.size:,} bytes, {state.version}; "
            f"listed {ref.size:,} bytes, {ref.version}): a rerun reads it",
            transient=True,
        )
        return None
    return stream


def _wanted(read: ForeignRead) -> Any:
    useful = {*read.image_members, "cls"}
    return lambda extension: extension in useful


def _shard_rows(ref: ShardRef, read: ForeignRead, state: _ForeignState) -> Iterator[dict]:
    """The good rows of one foreign shard; what goes wrong ends up in `state`."""
    stream = _open(ref, read, state)
    if stream is None:
        return
    keys: set[str] = set()
    with stream:
        try:
            for sample in tar_samples(stream, read.limits.max_bytes, _wanted(read)):
                state.seen += 1
                state.last_key = sample.key
                if sample.key in keys:
                    state.bad_sample(
                        sample.key, "key met twice in the shard (members not adjacent)"
                    )
                    continue
                keys.add(sample.key)
                if sample.oversized:
                    state.bad_sample(sample.key, sample.oversized)
                    continue
                try:
                    row = _sample_row(ref.url, sample, read)
                except _BadSample as err:
                    state.bad_sample(sample.key, str(err))
                    continue
                state.rows += 1
                yield row
        except TransientReadError as err:
            state.retries = stream.retries
            if read.on_error == "fail":
                raise
            state.give_up(state.last_key, str(err), transient=True)
            return
        except FileNotFoundError:
            state.give_up(state.last_key, f"shard deleted at {ref.url} while it was read")
            return
        except (tarfile.TarError, EOFError) as err:
            state.give_up(state.last_key, f"unreadable tar after {state.seen} samples ({err})")
            return
        state.retries = stream.retries


def iter_foreign_shard(
    ref: ShardRef,
    read: ForeignRead,
    *,
    problems: list[Skipped] | None = None,
    report: Report | None = None,
) -> Iterator[dict]:
    """The rows of one foreign shard (see the module docstring).

    Under "skip", problems are logged, appended to `problems`, and `report(outcome, records)` is
    called once the shard has been read to its end, before its last row is handed on; under
    "fail" the first bad sample or unreadable tar raises CorruptDataError, and storage that keeps
    failing raises TransientReadError.
    """
    state = _ForeignState(ref.url, read.on_error)
    yield from hold_last_row(_shard_rows(ref, read, state), state, problems, report, True)


def fetch_images(
    url: str,
    keys: Iterable[str],
    shape: tuple[int, int, int],
    storage: StorageConfig | None = None,
    *,
    limits: ImageLimits | None = None,
    retry: RetryPolicy | None = None,
    image_members: Sequence[str] = IMAGE_MEMBERS,
) -> dict[str, FittedImage]:
    """The images of `keys` in the shard at `url` (prepared or foreign), fitted to `shape`.

    For looking at a few images (a grid of the least likely), not for reading splits: the tar
    is streamed until every key is found, only those images are decoded, and a key that is
    absent or does not decode is left out of the result (and logged).
    """
    wanted, found = set(keys), {}
    members = tuple(image_members)
    limits = limits or ImageLimits()
    fs, path = fsspec_filesystem(url, storage)
    with ResumingReader(fs, path, retry or RetryPolicy(), what=url) as stream:
        for sample in tar_samples(stream, limits.max_bytes, lambda ext: ext in members):
            if sample.key not in wanted:
                continue
            chosen = next((m for m in members if m in sample.members), None)
            try:
                if chosen is None:
                    raise BadImage(f"no image member (found {sorted(sample.unread)})")
                data = sample.members[chosen]
                found[sample.key] = decode_fitted(data, shape[0], shape[1:], limits)
            except BadImage as err:
                logger.warning("%s: key %s: %s", url, sample.key, err)
            if len(found) == len(wanted):
                break
    for key in sorted(wanted - set(found))[:5]:
        logger.warning("%s: key %s not found or not decodable", url, key)
    return found
