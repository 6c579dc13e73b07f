"""Reading WebDataset shards as image rows: one shard reader for every tar, one iterator and one
Ray Data dataset over any input.

    plan = resolve_input("s3://bucket/photos/{000000..004999}.tar", storage)  # pipeline.data.inputs
    ds = read_input(plan, storage, shape=(3, 64, 64), on_error="skip", tally=SkipTally.shared())
    for row in iter_input(plan, storage, shape=(3, 64, 64)): ...              # same rows, no Ray
    for row in iter_shard(plan.shards[0], ReadOptions(shape=(3, 64, 64))): ...

Samples follow the WebDataset conventions (webdataset 1.0.2, Ray Data's read_webdataset): a sample
is the run of consecutive members sharing a key, the member's path up to the first dot of its base
name; the extension is the rest, lower-cased. The image is the member whose extension comes first
in `image_members` (default jpg, jpeg, png, webp); `cls` holds the label in decimal (-1 without);
other members (`json`, `txt`, `seg.png`, ...) are tolerated and not read.

A shard with a manifest entry (`ShardRef.expect`, a prepared split's; `pipeline.data.inputs`
decides) must be what the entry says: size, sha256, sample count, and every image of `shape`
already (mode and size checked from its header). Any other shard is fitted: each image decoded,
turned upright and fitted to `shape` by `images.decode_fitted`, prepare's rules, so a prepared
and an in-place read of the same bytes give the same pixels; such a shard whose size or version
at open differs from the listing's is left out as `transient` (a rerun, listing again, reads it),
and one replaced while it is read (`streams.ObjectReplaced`) is left out with that reason.

Rows (COLUMNS): key (`__key__`); shard (its URL); image (uint8 [C, H, W] = `shape`); label;
nbytes (of the encoded image); orig_width, orig_height (size before fitting, -1 with a manifest
entry); shard_rows (-1, except on the last row of a complete shard: the rows it handed on, so a
consumer holding that many rows of a shard holds all of them, in whatever order they came).

Storage faults are never bad data: `streams.ResumingReader` retries them and resumes at the byte
reached; storage failing past `retry` leaves the shard out as `transient` under "skip" and raises
`TransientReadError` (a StorageError) under "fail".

Bad data, under `on_error`: a sample goes when its image does not decode, breaks the `limits`
(checked from the tar and image headers, before decoding) or, with a manifest entry, has another
mode or size; when it has no image member, a bad `cls`, or a key met before. The whole shard goes
when it is missing, its tar ends early or is unreadable, or, with a manifest entry, its size,
sha256 or sample count differ. "fail" raises `CorruptDataError` naming the shard URL and key
(WHOLE_SHARD for a shard); "skip" logs it with shard and key, reports it to the tally (required)
and goes on. Outcomes and skip records are keyed by shard URL.

Whole shards: a shard's outcome is reported before its last row is handed on, and that row only
if the shard is complete. Rows of a shard found incomplete later may have been handed on already:
consumers that need whole shards (scoring) drop a shard whose outcome says `complete=False`.

Before any work the plan's listing is checked: under "fail", shard files a manifest does not list
are a ManifestError, and a listed shard missing or resized, or a pattern's or list's missing
shard, a CorruptDataError; under "skip" the first are ignored and the others reported left out.

Shuffling (training): `shuffle=True` permutes the shard order at every execution (epoch; see
`ray_source.tasks_datasource`) and the rows within each shard (one shard's rows are buffered).
For mixing across shards, add Ray Data's `local_shuffle_buffer_size=...` when iterating.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline.data.images import BadImage, FittedImage, ImageLimits, decode_fitted, decode_image
from pipeline.data.inputs import InputError, InputPlan, ShardRef, resolve_input
from pipeline.data.shards import MANIFEST_NAME, ManifestError, ShardInfo
from pipeline.data.streams import ObjectReplaced, ResumingReader, RetryPolicy, TransientReadError
from pipeline.data.tally import WHOLE_SHARD, CorruptDataError, OnError, ShardOutcome, Skipped
from pipeline.storage import StorageConfig, fsspec_filesystem, join_url

if TYPE_CHECKING:
    import ray.data

    from pipeline.data.tally import SkipTally

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
COLUMNS = ("key", "shard", "image", "label", "nbytes", "orig_width", "orig_height", "shard_rows")


@dataclass(frozen=True)
class ReadOptions:
    """How to read shards (picklable: sent to Ray read tasks): `shape` (C, H, W) of every row's
    image, C 1 or 3; `on_error` "fail" raises at the first bad image or shard, "skip" reports it
    and goes on; `limits` checked before decoding; `retry` of storage faults; `image_members`:
    the extensions taken as the image, in order of preference."""

    shape: tuple[int, int, int]
    storage: StorageConfig | None = None
    on_error: OnError = "fail"
    limits: ImageLimits = ImageLimits()
    retry: RetryPolicy = RetryPolicy()
    image_members: Sequence[str] = IMAGE_MEMBERS

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
            raise ValueError(f"shape: expected (C, H, W) with C in 1, 3, found {self.shape}")
        if not self.image_members:
            raise ValueError("image_members: expected at least one extension, found none")
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error: expected 'skip' or 'fail', found {self.on_error!r}")
        members = tuple(m.lower().lstrip(".") for m in self.image_members)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "image_members", members)

    def wanted(self, extension: str) -> bool:
        """Whether a member is read: the image candidates and the label."""
        return extension in self.image_members or extension == "cls"


# ----------------------------------------------------------------------------- samples


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


READ_CHUNK = 1 << 20  # bytes asked of a shard's stream per read
_BLOCK = tarfile.BLOCKSIZE
_END_BLOCK = bytes(_BLOCK)
_OCTAL_BYTES = b" 01234567\0"
_SPACE_BETWEEN_DIGITS = re.compile(rb"[0-7] +[0-7]")
_ENCODING = tarfile.ENCODING


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(_ENCODING, "surrogateescape")


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _byte_sum(data: bytes) -> int:
    """The sum of `data`'s bytes, up to 256 of them (adler32's low half is 1 + that sum modulo
    65521, and 256 x 255 is less)."""
    return (zlib.adler32(data) & 0xFFFF) - 1


def _plain_header(block: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is_file) of a header that tarfile reads without state: a regular file or a
    directory, octal number fields and an unsigned checksum that matches. None for any other
    header (pax, GNU long names, links, base-256 numbers, a bad checksum), left to tarfile."""
    kind = block[156:157]
    # mode, uid, gid, size, mtime, chksum, devmajor, devminor: as nti reads them, or refused
    numbers = block[100:156] + block[329:345]
    if (
        kind not in (b"0", b"\0", b"5")
        or numbers.translate(None, _OCTAL_BYTES)
        or _SPACE_BETWEEN_DIGITS.search(numbers)
    ):
        return None
    # tarfile's unsigned checksum: every byte, the chksum field's 8 counted as spaces
    unsigned = 256 + _byte_sum(block[:148]) + _byte_sum(block[156:334]) + _byte_sum(block[334:])
    if _octal(block[148:156]) != unsigned:
        return None
    name, prefix = _nts(block[:100]), _nts(block[345:500])
    is_file = kind != b"5" and not (kind == b"\0" and name.endswith("/"))
    return f"{prefix}/{name}" if prefix and is_file else name, _octal(block[124:136]), is_file


class _Raw(io.RawIOBase):
    """A stream with `read` alone as a raw stream, for io.BufferedReader: large reads (few calls
    through the layers below: hashing, retries, fsspec), exact-size reads above."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Chained:
    """A stream of `head` then `stream`."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            taken, self.head = self.head + self.stream.read(), b""
        else:
            taken, self.head = self.head[:size], self.head[size:]
        return taken


def _skip(stream: io.BufferedReader, size: int) -> bool:
    """Passes `size` bytes unread; False when the stream ends first."""
    while size > 0:
        step = min(size, READ_CHUNK)
        if len(stream.read(step)) < step:
            return False
        size -= step
    return True


def _truncated() -> tarfile.ReadError:
    return tarfile.ReadError("unexpected end of data")


def _tar_files(stream: Any) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """The regular files of a tar stream, in order: (name, size, read its data), as tarfile's
    stream mode gives them. Plain ustar headers are parsed here (`_plain_header`); from the
    first other header on, tarfile reads the rest. Data not read is passed unread. Raises
    tarfile.ReadError as tarfile does, and when the archive stops before its end blocks."""
    buffered, first, end = io.BufferedReader(_Raw(stream), READ_CHUNK), True, ""
    while True:
        block = buffered.read(_BLOCK)
        if block == _END_BLOCK:
            break
        header = _plain_header(block) if len(block) == _BLOCK else None
        if header is None:
            try:
                tarfile.TarInfo.frombuf(block, _ENCODING, "surrogateescape")
            except tarfile.HeaderError as err:
                if first:  # as tarfile.open raises at a bad first header
                    raise tarfile.ReadError(
                        "empty file" if isinstance(err, tarfile.EmptyHeaderError) else str(err)
                    ) from None
                end = f"{type(err).__name__}: {err}"
                break
            chained = _Chained(block, buffered)
            with tarfile.open(fileobj=chained, mode="r|", tarinfo=_EndAware) as archive:
                archive.flowray_end = "no end"  # type: ignore[attr-defined]
                for member in archive:
                    if member.isfile():
                        extracted = archive.extractfile(member)
                        yield member.name, member.size, extracted.read if extracted else bytes
            end = archive.flowray_end  # type: ignore[attr-defined]
            break
        first = False
        name, size, is_file = header
        if not is_file:
            continue
        padded = -size % _BLOCK
        unread = [True]

        def read(size: int = size, unread: list[bool] = unread) -> bytes:
            unread[0] = False
            data = buffered.read(size)
            if len(data) < size:
                raise _truncated()
            return data

        yield name, size, read
        if not _skip(buffered, padded + (size if unread[0] else 0)):
            raise _truncated()
    if end:
        raise tarfile.ReadError(f"archive ends without its end-of-archive blocks ({end})")


def tar_samples(
    stream: Any, max_bytes: int, wanted: Callable[[str], bool] | None = None
) -> Iterator[TarSample]:
    """The samples of a WebDataset tar stream, in order (see the module docstring).

    Members whose extension `wanted` refuses stream past unread; a wanted member larger than
    `max_bytes` (from its tar header) is not read and makes the sample `oversized`. Raises
    tarfile.TarError / EOFError on a truncated or unreadable archive, or one that stops before
    its end-of-archive blocks (after the samples before it; the one in progress is not yielded).
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    unread: list[str] = []
    oversized = ""
    for path, size, read in _tar_files(stream):
        folder, _, base = path.rpartition("/")
        stem, _, extension = base.partition(".")
        extension = extension.lower()
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key:
            if key is not None:
                yield TarSample(key, members, tuple(unread), oversized)
            key, members, unread, oversized = member_key, {}, [], ""
        if wanted is not None and not wanted(extension):
            unread.append(extension)
        elif size > max_bytes:
            oversized = (
                f"member {base} of {size:,} bytes is larger than the limit of "
                f"{max_bytes:,} bytes (max_bytes)"
            )
        else:
            members[extension] = read()
    if key is not None:
        yield TarSample(key, members, tuple(unread), oversized)


class BadSample(Exception):
    """One sample cannot be used; the message says why."""


def sample_row(sample: TarSample, shard: str, options: ReadOptions, exact: bool = False) -> dict:
    """The row of one sample (COLUMNS; `shard_rows` -1). `exact`: the image must already be of
    `options.shape` (a shard with a manifest entry); otherwise it is fitted to it.

    Raises:
        BadSample: no image member, an oversized, undecodable or (exact) misshapen image, or a
            bad `cls`.
    """
    if sample.oversized:
        raise BadSample(sample.oversized)
    chosen = next((e for e in options.image_members if e in sample.members), None)
    if chosen is None:
        found = sorted([*sample.members, *sample.unread]) or ["nothing"]
        raise BadSample(
            f"no image member: expected one of {', '.join(options.image_members)}, found "
            f"{', '.join(found)}"
        )
    data = sample.members[chosen]
    try:
        if exact:
            image, width, height = decode_image(data, options.shape, options.limits), -1, -1
        else:
            fitted = decode_fitted(data, options.shape[0], options.shape[1:], options.limits)
            image, width, height = fitted.pixels, fitted.width, fitted.height
    except BadImage as err:
        raise BadSample(f"{chosen}: {err}") from err
    label = -1
    if "cls" in sample.members:
        try:
            label = int(sample.members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as err:
            raise BadSample(f"bad cls {sample.members['cls'][:20]!r}") from err
    return {
        "key": sample.key,
        "shard": shard,
        "image": image,
        "label": label,
        "nbytes": len(data),
        "orig_width": width,
        "orig_height": height,
        "shard_rows": -1,
    }


# ----------------------------------------------------------------------------- one shard


class _Hashing:
    """A stream that hashes every byte read through it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


@dataclass
class _ShardState:
    """What reading one shard has found so far; raises under on_error="fail"."""

    url: str
    on_error: OnError
    expect: ShardInfo | None
    rows: int = 0  # rows produced (the last one may still be held back)
    seen: int = 0  # samples met in the tar, good or bad
    last_key: str = WHOLE_SHARD
    bad: list[Skipped] = field(default_factory=list)
    reason: str = ""  # why the shard is incomplete; "" while it may be complete
    reason_key: str = WHOLE_SHARD
    transient: bool = False
    retries: int = 0
    version: str = ""

    def bad_sample(self, key: str, reason: str) -> None:
        if self.on_error == "fail":
            raise CorruptDataError(self.url, key, reason)
        logger.warning("skipped 1 sample in shard %s at key %s: %s", self.url, key, reason)
        self.bad.append(Skipped(self.url, key, reason))

    def give_up(self, key: str, reason: str, transient: bool = False) -> None:
        if self.on_error == "fail" and transient:
            raise TransientReadError(
                f"{self.url}: {reason}", hint="the data is not known to be bad; rerun the job"
            )
        if self.on_error == "fail":
            raise CorruptDataError(self.url, key, reason)
        self.reason, self.reason_key, self.transient = reason, key, transient

    def outcome(self, handed: int) -> tuple[ShardOutcome, list[Skipped]]:
        records = list(self.bad)
        expected = self.expect.count if self.expect is not None else self.seen
        if self.reason:
            lost = max(expected - handed - len(self.bad), 0)
            logger.warning(
                "left out shard %s (%d of %d samples not handed on, at key %s): %s",
                self.url,
                lost,
                expected,
                self.reason_key,
                self.reason,
            )
            records.append(Skipped(self.url, self.reason_key, self.reason, lost))
        outcome = ShardOutcome(
            shard=self.url,
            expected=expected,
            rows=handed,
            complete=not self.reason,
            reason=self.reason,
            skipped_keys=tuple(r.key for r in self.bad),
            retries=self.retries,
            transient=self.transient,
            version=self.version,
        )
        return outcome, records


def _size_reason(found: int, expected: int) -> str:
    return f"shard has {found:,} bytes, manifest says {expected:,} (truncated or replaced)"


class ShardChanged(Exception):
    """A shard is not the file its manifest entry or its listing describes; `transient`: it
    changed after it was listed (a rerun, listing again, reads it)."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.transient = transient


def open_shard(ref: ShardRef, options: ReadOptions) -> ResumingReader:
    """The shard's stream, checked against its manifest entry's size, or else against the
    listing's size and version. Raises FileNotFoundError, ShardChanged or TransientReadError."""
    fs, path = fsspec_filesystem(ref.url, options.storage)
    stream = ResumingReader(fs, path, options.retry, what=ref.url)
    if ref.expect is not None:
        if stream.size == ref.expect.bytes:
            return stream
        reason = _size_reason(stream.size, ref.expect.bytes)
    elif stream.size == ref.size and (not ref.version or stream.version == ref.version):
        return stream
    else:
        # Rewritten between the listing and now: what was planned is not what is there.
        reason = (
            f"shard changed after it was listed ({stream.size:,} bytes, {stream.version}; "
            f"listed {ref.size:,} bytes, {ref.version}): a rerun reads it"
        )
    stream.close()
    raise ShardChanged(reason, transient=ref.expect is None)


def _shard_rows(ref: ShardRef, options: ReadOptions, state: _ShardState) -> Iterator[dict]:
    """The good rows of one shard; what goes wrong ends up in `state`."""
    expect = ref.expect
    stream: ResumingReader | None = None
    keys: set[str] = set()
    try:
        stream = open_shard(ref, options)
        state.version = stream.version
        # Only a manifest entry has a sha256 to check: a foreign shard's bytes go unhashed.
        hashing = _Hashing(stream) if expect is not None else None
        with stream:
            for sample in tar_samples(hashing or stream, options.limits.max_bytes, options.wanted):
                state.seen += 1
                state.last_key = sample.key
                if expect is not None and state.seen > expect.count:
                    reason = f"holds more samples than the {expect.count} its manifest lists"
                    state.give_up(sample.key, reason)
                    return
                if sample.key in keys:
                    state.bad_sample(
                        sample.key, "key met twice in the shard (members not adjacent)"
                    )
                    continue
                keys.add(sample.key)
                try:
                    row = sample_row(sample, ref.url, options, exact=expect is not None)
                except BadSample as err:
                    state.bad_sample(sample.key, str(err))
                    continue
                state.rows += 1
                yield row
            while hashing is not None and hashing.read(1 << 20):
                pass  # the tar's zero blocks and padding: the hash covers the whole file
    except ShardChanged as err:
        state.give_up(WHOLE_SHARD, str(err), err.transient)
    except ObjectReplaced as err:  # never resumed into: its rows so far are dropped with it
        state.give_up(WHOLE_SHARD, f"{err}; a rerun, listing again, reads the new file")
    except TransientReadError as err:
        if options.on_error == "fail":
            raise
        state.give_up(state.last_key, str(err), transient=True)
    except FileNotFoundError:
        state.give_up(state.last_key, f"shard missing at {ref.url}")
    except (tarfile.TarError, EOFError) as err:
        state.give_up(state.last_key, f"unreadable tar after {state.seen} samples ({err})")
    finally:
        state.retries = stream.retries if stream is not None else 0
    if state.reason or expect is None or hashing is None:
        return
    if state.seen < expect.count:
        state.give_up(
            state.last_key, f"shard holds {state.seen} samples, manifest says {expect.count}"
        )
    elif hashing.digest.hexdigest() != expect.sha256:
        state.give_up(
            WHOLE_SHARD,
            f"sha256 {hashing.digest.hexdigest()[:12]}... differs from the manifest's "
            f"{expect.sha256[:12]}... (the file changed after prepare)",
        )


def iter_shard(
    ref: ShardRef,
    options: ReadOptions,
    report: Callable[[ShardOutcome, Sequence[Skipped]], None] | None = None,
) -> Iterator[dict]:
    """The rows of one shard (module docstring: checks, whole shards); `report(outcome, records)`
    is called before its last row is handed on."""
    state = _ShardState(ref.url, options.on_error, ref.expect)
    held = None
    for row in _shard_rows(ref, options, state):
        if held is not None:
            yield held
        held = row
    complete = not state.reason
    handed = state.rows - (1 if held is not None and not complete else 0)
    outcome, records = state.outcome(handed)
    if report is not None:
        report(outcome, records)
    if held is not None and complete:
        held["shard_rows"] = handed
        yield held


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Job:
    """Everything a read task needs (picklable): the shards to read, by URL, and how."""

    refs: dict[str, ShardRef]
    options: ReadOptions
    tally: SkipTally | None

    def rows(self, urls: Sequence[str], seed: int | None, shuffle: bool) -> Iterator[dict]:
        """The rows of the shards `urls`, in that order (shuffled within each shard)."""
        rng = np.random.default_rng(seed) if shuffle else None
        report = self.tally.add_outcome if self.tally is not None else None
        for url in urls:
            rows = iter_shard(self.refs[url], self.options, report)
            if rng is None:
                yield from rows
            else:
                buffered = list(rows)  # one shard's decoded rows
                yield from (buffered[i] for i in rng.permutation(len(buffered)))


def _job(
    source: str | InputPlan,
    shards: Sequence[str] | None,
    options: ReadOptions,
    tally: SkipTally | None,
) -> _Job:
    """What to read, checked against the plan's listing before any work (module docstring)."""
    if options.on_error == "skip" and tally is None:
        raise ValueError(
            "on_error='skip' needs a tally to report skipped samples to: pass "
            "tally=SkipTally.shared() (Ray) or SkipTally() (iter_input)"
        )
    plan = source if isinstance(source, InputPlan) else resolve_input(source, options.storage)
    manifest = plan.manifest
    if manifest is not None and tuple(manifest.shape) != options.shape:
        raise InputError(
            f"{plan.spec} holds images of shape {list(manifest.shape)} (C, H, W), expected "
            f"{list(options.shape)}",
            hint="read it with a model of that shape, or prepare the data at the model's size",
        )
    if plan.extra:
        where = join_url(plan.root, MANIFEST_NAME)
        if options.on_error == "fail":
            raise ManifestError(
                f"{where} disagrees with the shards present: not in the manifest "
                f"{', '.join(plan.extra[:3])}",
                hint="a prefix holds one prepared split; rerun prepare into a new --output",
            )
        logger.warning("%s: files the manifest does not list are ignored: %s", where, plan.extra)
    by_url = {ref.url: ref for ref in plan.shards}
    unknown = [u for u in shards or () if u not in by_url]
    if unknown:
        raise ValueError(
            f"no shard {unknown[0]!r} in {plan.spec} (it has {len(plan.shards)}: "
            f"{plan.shards[0].url}...)"
        )
    refs = list(plan.shards) if shards is None else [by_url[u] for u in shards]
    named = plan.missing if shards is None else ()
    refused: dict[str, tuple[ShardInfo | None, str]] = {
        u: (None, f"shard missing at {u} (named by {plan.spec})") for u in named
    }
    for ref in refs:
        if ref.expect is not None and ref.size != ref.expect.bytes:
            missing = ref.size < 0
            reason = _size_reason(ref.size, ref.expect.bytes)
            refused[ref.url] = (ref.expect, f"shard missing at {ref.url}" if missing else reason)
    for url, (expect, reason) in refused.items():
        state = _ShardState(url, options.on_error, expect)
        state.give_up(WHOLE_SHARD, reason)  # raises under "fail"
        tally.add_outcome(*state.outcome(handed=0))  # type: ignore[union-attr]
    return _Job({r.url: r for r in refs if r.url not in refused}, options, tally)


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
    """The rows of an input (a spec, resolved here, or a plan), in this process, without Ray.

    Args:
        source: what `pipeline.data.inputs.resolve_input` accepts, or its plan.
        shape: (C, H, W) of the rows' images (a prepared split must hold that shape).
        shards: URLs of the plan's shards to read (default: all, in plan order).
        on_error: "fail" or "skip" (then `tally` is required).
        shuffle, seed: shard order and rows within shards (see the module docstring).
        limits, retry, image_members: see `ReadOptions`.
    """
    options = ReadOptions(
        shape, storage, on_error, limits or ImageLimits(), retry or RetryPolicy(), image_members
    )
    job = _job(source, shards, options, tally)
    urls = list(job.refs)
    if shuffle:
        np.random.default_rng(seed).shuffle(urls)
    return job.rows(urls, seed, shuffle)


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
    """A lazy Ray Data dataset of an input's rows; decoding happens in the read tasks.

    The arguments are `iter_input`'s (`tally` must be `SkipTally.shared()`), and:
        rows_per_block: rows per Ray Data block emitted by a read task.
        concurrency: at most this many read tasks at once (default: Ray decides).
        ray_remote_args: passed to the read tasks (num_cpus, memory, runtime_env, ...).
        epoch_of: where a shuffled read gets its epoch (`ray_source.tasks_datasource`).
    """
    import ray.data

    from pipeline.data.ray_source import TaskPlan, tasks_datasource

    if tally is not None and not tally.is_shared:
        raise ValueError("read_input runs in Ray tasks: pass tally=SkipTally.shared()")
    options = ReadOptions(
        shape, storage, on_error, limits or ImageLimits(), retry or RetryPolicy(), image_members
    )
    job = _job(source, shards, options, tally)
    refs = list(job.refs.values())
    plan = TaskPlan(
        name="FlowrayInput",
        urls=[r.url for r in refs],
        rows=[r.expect.count if r.expect is not None else None for r in refs],
        bytes_per_row=int(np.prod(options.shape)),
        read=job.rows,
    )
    return ray.data.read_datasource(
        tasks_datasource(plan, shuffle, seed, rows_per_block, epoch_of),
        concurrency=concurrency,
        ray_remote_args=ray_remote_args or {},
    )


def fetch_images(
    url: str, keys: Iterable[str], shape: tuple[int, int, int], storage: StorageConfig | None = None
) -> dict[str, FittedImage]:
    """The images of `keys` in the shard at `url` (prepared or foreign), fitted to `shape`.

    For looking at a few images (a grid of the least likely), not for reading inputs: the tar
    is streamed until every key is found, only those images are decoded, and a key that is
    absent or does not decode is left out of the result (and logged).
    """
    options = ReadOptions(shape, storage)
    wanted, found = set(keys), {}
    fs, path = fsspec_filesystem(url, storage)
    try:
        with ResumingReader(fs, path, options.retry, what=url) as stream:
            for sample in tar_samples(stream, options.limits.max_bytes, options.wanted):
                if sample.key not in wanted:
                    continue
                try:
                    row = sample_row(sample, url, options)
                except BadSample as err:
                    logger.warning("%s: key %s: %s", url, sample.key, err)
                else:
                    found[sample.key] = FittedImage(
                        row["image"], row["orig_width"], row["orig_height"]
                    )
                if len(found) == len(wanted):
                    break
    except ObjectReplaced as err:  # the images found so far are of the file first opened
        logger.warning("%s", err)
    for key in sorted(wanted - set(found))[:5]:
        logger.warning("%s: key %s not found or not decodable", url, key)
    return found
