"""Foreign WebDataset shards as an image source for `flowray prepare` (re-sharding them).

    source = open_source("webdataset:s3://bucket/photos/{000000..000099}.tar", storage,
                         size=(64, 64))        # also a prefix, a list file or one .tar

Re-exported by `pipeline.data.sources`, where `open_source("webdataset:<spec>")` makes one. The
input is resolved once (`pipeline.data.inputs.resolve_input`), then a census streams each shard
once, reading only the `cls` members, to count its samples (a prepared split's indices need
counts up front) and to learn whether every sample is labelled; the shards are read again when
the images are written. One split, "train" (`--val-fraction` carves a "val" split as for
folders). Images go through `images.decode_fitted` like folder files and foreign reads, so the
prepared pixels equal an in-place read of the same shards at the same shape.

Bad inputs follow prepare's on_error policy: a sample without an image member, one that does not
decode or breaks the `limits`, or a bad `cls` comes back as a `SourceImage` with `error` set (its
key "<shard URL>#<key>"). A shard the census could not read to its end (truncated, unreadable) or
that a pattern or list names but does not exist adds one more bad input ("<shard URL>#*") after
its readable samples, so "fail" stops prepare naming it and "skip" counts it. A shard that changed
after it was listed raises SourceError: the source's description carries a digest of the listing
(URL, size, version of every shard), so a rerun over changed shards is refused by prepare rather
than mixed with shards written from the old ones.
"""

from __future__ import annotations

import bisect
import logging
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.data.foreign import IMAGE_MEMBERS
from pipeline.data.images import BadImage, ImageLimits, decode_fitted
from pipeline.data.inputs import InputPlan, ShardRef, resolve_input, version_of
from pipeline.data.shard_reader import TarSample, tar_samples
from pipeline.data.source_base import SourceError, SourceImage, check_target
from pipeline.data.streams import ResumingReader, RetryPolicy
from pipeline.storage import StorageConfig, fsspec_filesystem

__all__ = ["WebDatasetSource"]

logger = logging.getLogger(__name__)
_CENSUS_THREADS = 8  # shards counted at once: I/O bound, each a stream of its own


@dataclass(frozen=True)
class _Census:
    """One shard counted: its samples, whether all carry `cls`, and why it ended early."""

    count: int
    labelled: bool
    damage: str  # "" when read to its end


def _stream(ref: ShardRef, storage: StorageConfig | None, retry: RetryPolicy) -> ResumingReader:
    fs, path = fsspec_filesystem(ref.url, storage)
    stream = ResumingReader(fs, path, retry, what=ref.url)
    if stream.size != ref.size or (ref.version and version_of(stream.info) != ref.version):
        stream.close()
        raise SourceError(
            f"{ref.url} changed after it was listed ({stream.size:,} bytes, "
            f"{version_of(stream.info)}; listed {ref.size:,} bytes, {ref.version})",
            hint="rerun prepare into a new --out once the shards stop changing",
        )
    return stream


def _count(ref: ShardRef, storage: StorageConfig | None, retry: RetryPolicy) -> _Census:
    count, labelled = 0, True
    try:
        with _stream(ref, storage, retry) as stream:
            for sample in tar_samples(stream, 1 << 20, lambda extension: extension == "cls"):
                count += 1
                labelled = labelled and "cls" in sample.members
    except FileNotFoundError:
        return _Census(0, False, f"shard missing at {ref.url} (deleted after it was listed)")
    except (tarfile.TarError, EOFError) as err:
        return _Census(count, labelled, f"unreadable tar after {count} samples ({err})")
    return _Census(count, labelled and count > 0, "")


class WebDatasetSource:
    """Foreign WebDataset shards (see the module docstring). One split, "train"."""

    def __init__(
        self,
        spec: str,
        storage: StorageConfig | None = None,
        channels: int | None = None,
        size: tuple[int, int] | None = None,
        limits: ImageLimits | None = None,
        retry: RetryPolicy | None = None,
        image_members: Sequence[str] = IMAGE_MEMBERS,
    ) -> None:
        check_target(channels, size)
        if size is None:
            raise SourceError(
                f"webdataset source {spec}: its images differ in size, so a target size is needed",
                hint="pass --size HxW, e.g. --size 64x64",
            )
        self.spec, self.storage = spec, storage
        self.limits, self.retry = limits or ImageLimits(), retry or RetryPolicy()
        self.image_members = tuple(m.lower().lstrip(".") for m in image_members)
        self.plan: InputPlan = resolve_input(spec, storage)
        if self.plan.is_prepared:
            raise SourceError(
                f"{spec} is a split prepared already (it holds manifest.json)",
                hint="train or score it directly, or pass --source webdataset:<its *.tar shards>",
            )
        logger.info("%s", self.plan.describe())
        with ThreadPoolExecutor(_CENSUS_THREADS) as pool:
            census = list(pool.map(lambda r: _count(r, storage, self.retry), self.plan.shards))
        self.counts = [c.count for c in census]
        self.damage = [c.damage for c in census]
        self._labelled = bool(census) and all(c.labelled for c in census)
        # Index layout: per shard its samples, then one index for its damage when it has any;
        # then one index per missing shard.
        sizes = [c.count + (1 if c.damage else 0) for c in census]
        self._starts = [0]
        for n in sizes:
            self._starts.append(self._starts[-1] + n)
        self._total = self._starts[-1] + len(self.plan.missing)
        self._shape = (channels or 3, *size)

    @property
    def description(self) -> str:
        return f"webdataset:{self.spec}#{self.plan.digest()}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def classes(self) -> tuple[str, ...] | None:
        return None

    @property
    def has_labels(self) -> bool:
        return self._labelled

    def splits(self) -> dict[str, int]:
        return {"train": self._total}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        if split != "train":
            raise KeyError(split)
        wanted: dict[int, list[int]] = {}  # shard position -> its ordinals, ascending
        previous = -1
        for index in indices:
            if index <= previous:
                raise ValueError(f"indices must be ascending, found {index} after {previous}")
            if not 0 <= index < self._total:
                raise IndexError(f"index {index} out of range (the split has {self._total})")
            previous = index
            position = bisect.bisect_right(self._starts, index) - 1
            wanted.setdefault(position, []).append(index - self._starts[position])
        for position in sorted(wanted):
            if position >= len(self.plan.shards):  # a missing shard of the pattern or list
                url = self.plan.missing[position - len(self.plan.shards)]
                yield SourceImage(f"{url}#*", None, None, f"shard missing at {url}")
                continue
            yield from self._read_shard(position, wanted[position])

    def _read_shard(self, position: int, ordinals: list[int]) -> Iterator[SourceImage]:
        ref, count = self.plan.shards[position], self.counts[position]
        want = set(ordinals)
        if count in want:  # the index after the samples: the shard's damage
            want.discard(count)
        last = max(want, default=-1)
        if want:
            with _stream(ref, self.storage, self.retry) as stream:
                samples = tar_samples(stream, self.limits.max_bytes, self._wanted)
                for ordinal, sample in enumerate(samples):
                    if ordinal in want:
                        yield self._image(ref, sample)
                    if ordinal == last:
                        break  # the rest of the shard is another task's
        if count in ordinals:
            yield SourceImage(f"{ref.url}#*", None, None, self.damage[position])

    def _wanted(self, extension: str) -> bool:
        return extension in self.image_members or extension == "cls"

    def _image(self, ref: ShardRef, sample: TarSample) -> SourceImage:
        key = f"{ref.url}#{sample.key}"
        label = None
        if self._labelled:
            try:
                label = int(sample.members["cls"].decode("ascii").strip())
            except (KeyError, UnicodeDecodeError, ValueError):
                return SourceImage(key, None, None, f"bad cls {sample.members.get('cls')!r:.30}")
        chosen = next((e for e in self.image_members if e in sample.members), None)
        if sample.oversized:
            return SourceImage(key, None, label, sample.oversized)
        if chosen is None:
            found = ", ".join(sorted([*sample.members, *sample.unread])) or "nothing"
            return SourceImage(key, None, label, f"no image member (found {found})")
        channels, *size = self._shape
        try:
            fitted = decode_fitted(sample.members[chosen], channels, tuple(size), self.limits)
        except BadImage as err:
            return SourceImage(key, None, label, f"{chosen}: {err}")
        return SourceImage(key, fitted.pixels, label)
