"""Image sources for `flowray prepare`: IDX files, .npy arrays, image folder trees and foreign
WebDataset shards, local or S3, each an `ImageSource` (`pipeline.data.shards`).

A source is a small picklable description sent to the Ray tasks that write shards; each task
reads only its own images: raw IDX and .npy rows by seeking, folder images one file at a time,
shards as streams (gzipped IDX files, tens of MB, are decompressed once per process).

One image path: raw pixels go through `images.fit_array`, encoded files through
`images.decode_fitted` (limits checked from the header, EXIF orientation), shard members through
the reader's `sample_row`, so prepared pixels equal an in-place read of the same shards. An
encoded image over `ImageLimits` or undecodable is a bad input (image=None, `error` set) for the
caller's on_error policy; storage faults are retried and never make an image a bad input.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import io
import itertools
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, NamedTuple

import numpy as np

from flowmodel.errors import FlowrayError
from pipeline.data.images import BadImage, ImageLimits, decode_fitted, fit_array
from pipeline.data.inputs import InputPlan, ShardRef, resolve_input
from pipeline.data.reader import (
    BadSample,
    ReadOptions,
    ShardChanged,
    TarSample,
    open_shard,
    sample_row,
    tar_samples,
)
from pipeline.data.shards import ImageSource, SourceImage
from pipeline.data.streams import RetryPolicy, with_retries
from pipeline.storage import StorageConfig, fsspec_filesystem, is_s3, join_url

logger = logging.getLogger(__name__)


class SourceError(FlowrayError, ValueError):
    """A source cannot be read as asked; the message says what was expected and what was found."""


def check_target(channels: int | None, size: tuple[int, int] | None, needs_size: str = "") -> None:
    """Refuse a target that is no image shape; `needs_size` names a source that needs a size."""
    if channels is not None and channels not in (1, 3):
        raise SourceError(f"channels: expected 1 or 3, found {channels}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise SourceError(f"size: expected (height, width) of positive integers, found {size}")
    if needs_size and size is None:
        raise SourceError(
            f"{needs_size}: its images differ in size, so a target size is needed",
            hint="pass --size HxW, e.g. --size 64x64",
        )


DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Rows read per request from IDX/.npy files: big enough to amortise S3 round trips, small enough
# to keep memory flat (4096 RGB 64x64 images are 50 MB).
_CHUNK_ROWS = 4096


def default_idx_dir() -> str:
    """FASHION_MNIST_DIR from the environment, else where Debian's dataset-fashion-mnist puts it."""
    return os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Ascending indices as (start, stop) runs of consecutive values, each at most _CHUNK_ROWS."""
    # Consecutive values share value - position.
    for _, run in itertools.groupby(enumerate(indices), lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        for first in range(0, len(values), _CHUNK_ROWS):
            yield values[first], values[min(first + _CHUNK_ROWS, len(values)) - 1] + 1


class _Array(NamedTuple):
    """A C-ordered array stored from byte `offset` of a file (IDX, .npy): rows read by seeking."""

    url: str
    shape: tuple[int, ...]  # (N, ...) rows first
    dtype: np.dtype
    offset: int

    def rows(self, storage: StorageConfig | None, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with _open_maybe_gzip(self.url, storage) as file:
            file.seek(self.offset + start * row)
            data = file.read((stop - start) * row)
        if len(data) != (stop - start) * row:
            raise SourceError(f"{self.url}: file ends early (wanted {(stop - start) * row} bytes)")
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])


class _ArraySource:
    """Images read by seeking in arrays (IdxSource, NpySource): per split (images, labels or
    None), the images laid out as `layout` (NHW, NHWC or NCHW), fitted to `shape`."""

    storage: StorageConfig | None
    shape: tuple[int, int, int]
    layout: str
    arrays: dict[str, tuple[_Array, _Array | None]]

    def splits(self) -> dict[str, int]:
        return {split: images.shape[0] for split, (images, _) in self.arrays.items()}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        """The images (and labels) of `indices`, keyed "<file>#<i>"."""
        images, labels = self.arrays[split]
        channels, *size = self.shape
        name = images.url.rsplit("/", 1)[-1]
        for start, stop in _runs(indices):
            block = images.rows(self.storage, start, stop)
            if self.layout == "NHW":
                block = block[..., None]  # (n, H, W) -> (n, H, W, 1)
            elif self.layout == "NCHW":
                block = block.transpose(0, 2, 3, 1)  # (n, C, H, W) -> (n, H, W, C)
            found = labels.rows(self.storage, start, stop) if labels is not None else None
            for i in range(stop - start):
                label = int(found[i]) if found is not None else None
                image = fit_array(block[i], channels, tuple(size))
                yield SourceImage(f"{name}#{start + i}", image, label)


@functools.lru_cache(maxsize=4)
def _gunzipped(url: str, storage: StorageConfig | None) -> bytes:
    """A .gz IDX file decompressed once per process: gzip cannot seek, and decompressing from
    the start for every shard would make writing quadratic."""
    fs, path = fsspec_filesystem(url, storage)
    with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as file:
        return file.read()


def _open_maybe_gzip(url: str, storage: StorageConfig | None) -> IO[bytes]:
    if url.endswith(".gz"):
        return io.BytesIO(_gunzipped(url, storage))
    fs, path = fsspec_filesystem(url, storage)
    return fs.open(path, "rb")


def _read_idx_header(url: str, storage: StorageConfig | None) -> _Array:
    with _open_maybe_gzip(url, storage) as file:
        head = file.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise SourceError(f"{url}: not an IDX file of unsigned bytes (magic {head.hex()})")
        ndim = head[3]
        dims = tuple(int.from_bytes(file.read(4), "big") for _ in range(ndim))
    return _Array(url, dims, np.dtype(np.uint8), 4 + 4 * ndim)


def _find_idx(folder: str, prefix: str, kind: str, storage: StorageConfig | None) -> str:
    fs, path = fsspec_filesystem(folder, storage)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        names = []
    matches = sorted(n for n in names if n.startswith(prefix) and kind in n)
    if not matches:
        raise SourceError(
            f"no {prefix}*{kind}* file in {folder} (an IDX folder holds train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)",
            hint="install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist`, set "
            "FASHION_MNIST_DIR, or pass --source idx:<folder with the four files>",
        )
    # Prefer the compressed file when both exist: it is what the Debian package ships.
    gz = [n for n in matches if n.endswith(".gz")]
    return join_url(folder, (gz or matches)[0])


class IdxSource(_ArraySource):
    """MNIST-format IDX files (.gz or raw) in a folder: splits "train" and "test", labels 0-9."""

    _PREFIXES = {"train": "train", "test": "t10k"}

    def __init__(
        self,
        folder: str,
        storage: StorageConfig | None = None,
        channels: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        check_target(channels, size)
        self.folder, self.storage, self.layout, self.arrays = folder, storage, "NHW", {}
        for split, prefix in self._PREFIXES.items():
            images = _read_idx_header(_find_idx(folder, prefix, "images-idx3", storage), storage)
            labels = _read_idx_header(_find_idx(folder, prefix, "labels-idx1", storage), storage)
            if (
                len(images.shape) != 3
                or len(labels.shape) != 1
                or images.shape[0] != labels.shape[0]
            ):
                raise SourceError(
                    f"{folder}: {split} images {images.shape} and labels {labels.shape} disagree: "
                    "expected [N, H, W] images and [N] labels"
                )
            self.arrays[split] = (images, labels)
        native = self.arrays["train"][0].shape[1:]
        self.shape = (channels or 1, *(size or native))
        self.description, self.classes, self.has_labels = f"idx:{folder}", None, True


def _read_npy_header(url: str, storage: StorageConfig | None) -> _Array:
    fs, path = fsspec_filesystem(url, storage)
    if not fs.exists(path):
        raise SourceError(f"no such .npy file: {url}")
    with fs.open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        except ValueError as err:
            raise SourceError(f"{url}: not a .npy file ({err})") from err
        offset = file.tell()
    if fortran:
        raise SourceError(f"{url}: Fortran-ordered arrays are not supported; save it C-ordered")
    return _Array(url, tuple(shape), np.dtype(dtype), offset)


class NpySource(_ArraySource):
    """Images in a .npy array ([N, H, W], [N, H, W, C] or [N, C, H, W], uint8, C in 1, 3, 4;
    channels-last when the last axis allows) and optional integer labels [N] in a second .npy.
    One split, "train"."""

    def __init__(
        self,
        images_url: str,
        labels_url: str | None = None,
        storage: StorageConfig | None = None,
        channels: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        check_target(channels, size)
        self.storage = storage
        self.images = _read_npy_header(images_url, storage)
        self.labels = _read_npy_header(labels_url, storage) if labels_url else None
        shape = self.images.shape
        if self.images.dtype != np.uint8:
            raise SourceError(f"{images_url}: expected uint8 images, found {self.images.dtype}")
        if len(shape) == 3:
            self.layout, native = "NHW", (1, shape[1], shape[2])
        elif len(shape) == 4 and shape[3] in (1, 3, 4):
            self.layout, native = "NHWC", (shape[3], shape[1], shape[2])
        elif len(shape) == 4 and shape[1] in (1, 3, 4):
            self.layout, native = "NCHW", (shape[1], shape[2], shape[3])
        else:
            raise SourceError(
                f"{images_url}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W] with "
                f"C in 1, 3, 4; found shape {list(shape)}"
            )
        if self.labels is not None and (
            self.labels.shape != (shape[0],) or self.labels.dtype.kind not in "iu"
        ):
            raise SourceError(
                f"{labels_url}: expected integer labels of shape [{shape[0]}], found "
                f"{self.labels.dtype} {list(self.labels.shape)}"
            )
        self.shape = (channels or (1 if native[0] == 1 else 3), *(size or native[1:]))
        labels = f",{self.labels.url}" if self.labels else ""
        self.description = f"npy:{self.images.url}{labels}"
        self.classes, self.has_labels = None, self.labels is not None
        self.arrays = {"train": (self.images, self.labels)}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FolderSource:
    """A tree of JPEG/PNG files, local or on S3, in sorted path order. One split, "train".
    When every image sits in root/<class>/<file>, the sorted folder names are the classes."""

    def __init__(
        self,
        url: str,
        storage: StorageConfig | None = None,
        channels: int | None = None,
        size: tuple[int, int] | None = None,
        limits: ImageLimits | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        check_target(channels, size, needs_size=f"folder source {url}")
        self.limits = limits or ImageLimits()
        self.retry = retry or RetryPolicy()
        self.url = url.rstrip("/")
        self.storage = storage
        fs, root = fsspec_filesystem(self.url, storage)
        if not fs.isdir(root):
            raise SourceError(f"no such folder: {url}", hint="check the path or the s3:// URL")
        found = fs.find(root, detail=True)
        prefix = root.rstrip("/") + "/"
        images = sorted(
            (p[len(prefix) :], int(info.get("size") or 0))
            for p, info in found.items()
            if p.lower().endswith(IMAGE_SUFFIXES) and p.startswith(prefix)
        )
        self.files = [name for name, _ in images]
        self.sizes = [size for _, size in images]  # from the listing: checked before a download
        if not self.files:
            raise SourceError(
                f"no images in {url}: expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            )
        labelled = all(f.count("/") == 1 for f in self.files)
        self.classes = tuple(sorted({f.split("/")[0] for f in self.files})) if labelled else None
        self.shape = (channels or 3, *size)
        self.description, self.has_labels = f"folder:{self.url}", labelled

    def splits(self) -> dict[str, int]:
        return {"train": len(self.files)}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        fs, root = fsspec_filesystem(self.url, self.storage)
        class_index = {name: i for i, name in enumerate(self.classes or ())}
        channels, *size = self.shape
        for index in indices:
            relative = self.files[index]
            path = f"{root.rstrip('/')}/{relative}"
            label = class_index[relative.split("/")[0]] if self.classes else None
            try:
                self.limits.check_bytes(self.sizes[index])  # before downloading it
                data = with_retries(functools.partial(fs.cat_file, path), self.retry, path)
                pixels = decode_fitted(data, channels, tuple(size), self.limits).pixels
            except BadImage as err:
                yield SourceImage(relative, None, label, str(err))
            else:
                yield SourceImage(relative, pixels, label)


_CENSUS_THREADS = 8  # shards counted at once: I/O bound, each a stream of its own


class _Census(NamedTuple):
    """One shard counted: its samples, whether all carry `cls`, and why it ended early."""

    count: int
    labelled: bool
    damage: str  # "" when read to its end


def _stream(ref: ShardRef, options: ReadOptions) -> Any:
    try:
        return open_shard(ref, options)
    except ShardChanged as err:
        raise SourceError(
            f"{ref.url}: {err}",
            hint="rerun prepare into a new --output once the shards stop changing",
        ) from err


def _count(ref: ShardRef, options: ReadOptions) -> _Census:
    count, labelled = 0, True
    try:
        with _stream(ref, options) as stream:
            for sample in tar_samples(stream, 1 << 20, lambda extension: extension == "cls"):
                count += 1
                labelled = labelled and "cls" in sample.members
    except FileNotFoundError:
        return _Census(0, False, f"shard missing at {ref.url} (deleted after it was listed)")
    except (tarfile.TarError, EOFError) as err:
        return _Census(count, labelled, f"unreadable tar after {count} samples ({err})")
    return _Census(count, labelled and count > 0, "")


class WebDatasetSource:
    """Foreign WebDataset shards, re-sharded by prepare: `webdataset:<spec>`, any spec that
    `resolve_input` takes but a prepared split. One split, "train".

    A census streams each shard once (reading only `cls` members) to count its samples and learn
    whether all are labelled. A bad sample comes back with `error` set, keyed "<shard URL>#<key>";
    a shard the census could not read to its end, or one that is missing, adds one bad input
    "<shard URL>#*". A shard changed since it was listed raises SourceError, and the description
    carries a digest of the listing, so a rerun over changed shards is refused.
    """

    def __init__(
        self,
        spec: str,
        storage: StorageConfig | None = None,
        channels: int | None = None,
        size: tuple[int, int] | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        check_target(channels, size, needs_size=f"webdataset source {spec}")
        self.limits = limits or ImageLimits()  # part of prepare's fingerprint
        self.shape = (channels or 3, *size)
        self.options = ReadOptions(self.shape, storage, limits=self.limits)
        self.plan: InputPlan = resolve_input(spec, storage)
        if self.plan.manifest is not None:
            raise SourceError(
                f"{spec} is a split prepared already (it holds manifest.json)",
                hint="train or score it directly, or pass --source webdataset:<its *.tar shards>",
            )
        logger.info("%s", self.plan.describe())
        with ThreadPoolExecutor(_CENSUS_THREADS) as pool:
            census = list(pool.map(lambda r: _count(r, self.options), self.plan.shards))
        self.counts = [c.count for c in census]
        self.damage = [c.damage for c in census]
        self.has_labels = bool(census) and all(c.labelled for c in census)
        # Index layout: per shard its samples, then one index for its damage when it has any;
        # then one index per missing shard.
        self._starts = [0, *itertools.accumulate(c.count + bool(c.damage) for c in census)]
        self._total = self._starts[-1] + len(self.plan.missing)
        self.description, self.classes = f"webdataset:{spec}#{self.plan.digest()}", None

    def splits(self) -> dict[str, int]:
        return {"train": self._total}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        wanted: dict[int, list[int]] = {}  # shard position -> its ordinals, ascending
        for index in indices:
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
        want = set(ordinals) - {count}  # index `count`, after the samples: the shard's damage
        if want:
            with _stream(ref, self.options) as stream:
                samples = tar_samples(stream, self.limits.max_bytes, self.options.wanted)
                # Up to the last one wanted: the rest of the shard is another task's.
                for ordinal, sample in enumerate(itertools.islice(samples, max(want) + 1)):
                    if ordinal in want:
                        yield self._image(ref, sample)
        if count in ordinals:
            yield SourceImage(f"{ref.url}#*", None, None, self.damage[position])

    def _image(self, ref: ShardRef, sample: TarSample) -> SourceImage:
        key = f"{ref.url}#{sample.key}"
        try:
            row = sample_row(sample, ref.url, self.options)
        except BadSample as err:
            return SourceImage(key, None, None, str(err))
        return SourceImage(key, row["image"], row["label"] if self.has_labels else None)


class FractionSplit:
    """Carve a "val" split out of a one-split source: a seeded random `val_fraction` of its
    images, depending only on (count, val_fraction, seed); each split keeps the source's order."""

    def __init__(self, base: ImageSource, val_fraction: float, seed: int = 0) -> None:
        splits = base.splits()
        if len(splits) != 1:
            raise SourceError(
                f"--val-fraction applies to one-split sources (folders, .npy); {base.description} "
                f"already has splits {sorted(splits)}"
            )
        if not 0.0 < val_fraction < 1.0:
            raise SourceError(f"val_fraction: expected a number in (0, 1), found {val_fraction}")
        self.base = base
        self.description = f"{base.description} (val_fraction={val_fraction}, seed={seed})"
        self.shape, self.classes, self.has_labels = base.shape, base.classes, base.has_labels
        self.limits = getattr(base, "limits", None)
        ((self._base_split, total),) = splits.items()
        order = np.random.default_rng(seed).permutation(total)
        n_val = int(round(total * val_fraction))
        self._members = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}

    def splits(self) -> dict[str, int]:
        return {name: len(members) for name, members in self._members.items()}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        members = self._members[split]
        return self.base.read(self._base_split, [int(members[i]) for i in indices])


def open_source(
    spec: str,
    storage: StorageConfig | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    limits: ImageLimits | None = None,
) -> ImageSource:
    """A source from a spec: `idx:<folder>` (alone: `default_idx_dir()`), `folder:<url>`,
    `npy:<images.npy>[,<labels.npy>]` or `webdataset:<brace pattern | prefix | list file | .tar>`;
    `limits` bound the encoded images of folder and webdataset sources."""
    kind, _, location = spec.partition(":")
    if kind == "idx":
        location = location or default_idx_dir()
        if not is_s3(location) and not os.path.isdir(location):
            raise SourceError(
                f"IDX folder not found: {location}",
                hint="install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist`, set "
                "FASHION_MNIST_DIR, or pass --source idx:<folder with the four IDX files>",
            )
        source: ImageSource = IdxSource(location, storage, channels, size)
    elif kind == "folder" and location:
        source = FolderSource(location, storage, channels, size, limits=limits)
    elif kind == "webdataset" and location:
        source = WebDatasetSource(location, storage, channels, size, limits=limits)
    elif kind == "npy" and location:
        images, _, labels = location.partition(",")
        source = NpySource(images, labels or None, storage, channels, size)
    else:
        raise SourceError(
            f"unknown source {spec!r}",
            hint="use idx:<folder>, folder:<url>, npy:<images.npy>[,<labels.npy>] or "
            "webdataset:<shard pattern, prefix or list>",
        )
    if val_fraction:
        source = FractionSplit(source, val_fraction, seed)
    return source
