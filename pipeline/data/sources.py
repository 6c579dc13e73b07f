"""Image sources for `flowray prepare`: IDX files, image folder trees, .npy arrays and foreign
WebDataset shards (`pipeline.data.webdataset_source`), local or S3.

A source is a small picklable description (URLs, target shape, a file list): it is sent to the Ray
tasks that write shards, and each task reads only the images of its own shards. Nothing reads a
whole large source into memory: raw IDX and .npy files are read by seeking to the requested rows,
folder images one file at a time (gzipped IDX files, tens of MB, are decompressed once per process).

The contract (`ImageSource`):
    splits()             -> {"train": 60000, "test": 10000}   split name -> number of images
    read(split, indices) -> SourceImage(key, image, label, error) per index, in order; indices
                            must be ascending. `image` is uint8 [C, H, W] in the target shape;
                            `key` says where it came from ("cats/0001.jpg", "t10k-images...gz#42").
                            An image that cannot be decoded comes back with image=None and `error`
                            set, so the caller's on_error policy decides (only folders produce them).
    shape, classes, has_labels, description

Every image goes through `fit_image` (pipeline.data.images): converted to the target channels
(1: luminance, 3: RGB; alpha is composited over white; 16-bit is scaled to 8-bit by its type's
range), then centre-cropped to the target aspect ratio and resized (Lanczos) to the target
height x width. Images already in the target shape are passed through untouched.

Image files (folder sources) are bad inputs, not crashes, when they break `ImageLimits`: a file
larger than `max_bytes` (known from the listing, so it is never downloaded) or a header declaring
more than `max_pixels` pixels (a decompression bomb) comes back with `error` set, like an
undecodable file, before any pixel is decoded.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Iterator, Sequence
from typing import IO, NamedTuple

import numpy as np

from pipeline.data.folders import FolderSource
from pipeline.data.images import ImageLimits, fit_array, fit_image
from pipeline.data.source_base import ImageSource, SourceError, SourceImage, check_target
from pipeline.storage import StorageConfig, fsspec_filesystem, is_s3, join_url

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FolderSource",
    "FractionSplit",
    "IdxSource",
    "ImageLimits",
    "ImageSource",
    "NpySource",
    "SourceError",
    "SourceImage",
    "default_idx_dir",
    "fit_image",
    "open_source",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Rows read per request from IDX/.npy files: big enough to amortise S3 round trips, small enough
# to keep memory flat (4096 RGB 64x64 images are 50 MB).
_CHUNK_ROWS = 4096


def default_idx_dir() -> str:
    """FASHION_MNIST_DIR from the environment, else where Debian's dataset-fashion-mnist puts it."""
    return os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Ascending indices as (start, stop) runs of consecutive values, each at most _CHUNK_ROWS."""
    start = prev = None
    for index in indices:
        if prev is not None and index <= prev:
            raise ValueError(f"indices must be ascending, found {index} after {prev}")
        if start is None:
            start = prev = index
        elif index == prev + 1 and index - start < _CHUNK_ROWS:
            prev = index
        else:
            yield start, prev + 1
            start = prev = index
    if start is not None:
        yield start, prev + 1


# ----------------------------------------------------------------------------- IDX


class _IdxFile(NamedTuple):
    url: str
    dims: tuple[int, ...]  # (N,) for labels, (N, H, W) for images
    offset: int  # header bytes


@functools.lru_cache(maxsize=4)
def _gunzipped(url: str, storage: StorageConfig | None) -> bytes:
    """A .gz IDX file decompressed, once per process: gzip cannot seek, and re-decompressing from
    the start for every shard made writing quadratic. IDX files are tens to hundreds of MB; store
    them uncompressed to read them by seeking instead."""
    fs, path = fsspec_filesystem(url, storage)
    with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as file:
        return file.read()


def _open_maybe_gzip(url: str, storage: StorageConfig | None) -> IO[bytes]:
    if url.endswith(".gz"):
        return io.BytesIO(_gunzipped(url, storage))
    fs, path = fsspec_filesystem(url, storage)
    return fs.open(path, "rb")


def _read_idx_header(url: str, storage: StorageConfig | None) -> _IdxFile:
    fs, path = fsspec_filesystem(url, storage)
    with (
        fs.open(path, "rb") as raw,
        gzip.GzipFile(fileobj=raw, mode="rb") if url.endswith(".gz") else raw as file,
    ):
        head = file.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise SourceError(f"{url}: not an IDX file of unsigned bytes (magic {head.hex()})")
        ndim = head[3]
        dims = tuple(int.from_bytes(file.read(4), "big") for _ in range(ndim))
    return _IdxFile(url, dims, 4 + 4 * ndim)


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


class IdxSource:
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
        self.folder = folder
        self.storage = storage
        self._files: dict[str, tuple[_IdxFile, _IdxFile]] = {}
        for split, prefix in self._PREFIXES.items():
            images = _read_idx_header(_find_idx(folder, prefix, "images-idx3", storage), storage)
            labels = _read_idx_header(_find_idx(folder, prefix, "labels-idx1", storage), storage)
            if len(images.dims) != 3 or len(labels.dims) != 1 or images.dims[0] != labels.dims[0]:
                raise SourceError(
                    f"{folder}: {split} images {images.dims} and labels {labels.dims} disagree: "
                    "expected [N, H, W] images and [N] labels"
                )
            self._files[split] = (images, labels)
        native = self._files["train"][0].dims[1:]
        self._shape = (channels or 1, *(size or native))

    @property
    def description(self) -> str:
        return f"idx:{self.folder}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def classes(self) -> tuple[str, ...] | None:
        return None

    @property
    def has_labels(self) -> bool:
        return True

    def splits(self) -> dict[str, int]:
        return {split: images.dims[0] for split, (images, _) in self._files.items()}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        # .gz files are decompressed into memory once per process (see _gunzipped); raw files
        # are read by seeking.
        images, labels = self._files[split]
        height, width = images.dims[1:]
        name = images.url.rsplit("/", 1)[-1]
        channels, *size = self._shape
        with (
            _open_maybe_gzip(images.url, self.storage) as image_file,
            _open_maybe_gzip(labels.url, self.storage) as label_file,
        ):
            for start, stop in _runs(indices):
                image_file.seek(images.offset + start * height * width)
                label_file.seek(labels.offset + start)
                count = stop - start
                pixels = _read_exact(image_file, count * height * width, images.url)
                label_bytes = _read_exact(label_file, count, labels.url)
                block = np.frombuffer(pixels, np.uint8).reshape(count, height, width, 1)
                for i in range(count):
                    image = fit_array(block[i], channels, tuple(size))
                    yield SourceImage(f"{name}#{start + i}", image, int(label_bytes[i]))


def _read_exact(file: IO[bytes], count: int, url: str) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise SourceError(f"{url}: file ends early (wanted {count} more bytes, got {len(data)})")
    return data


# ----------------------------------------------------------------------------- .npy


class _NpyFile(NamedTuple):
    url: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def _read_npy_header(url: str, storage: StorageConfig | None) -> _NpyFile:
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
    return _NpyFile(url, tuple(shape), np.dtype(dtype), offset)


class NpySource:
    """Images in a .npy array ([N, H, W], [N, H, W, C] or [N, C, H, W], uint8, C in 1, 3, 4) and
    optional integer labels [N] in a second .npy. One split, "train" (see `FractionSplit`).

    Layout: 3-D is greyscale; 4-D is channels-last when the last axis is 1, 3 or 4, else
    channels-first when axis 1 is. Rows are read by seeking, so the arrays can live on S3.
    """

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
        native_channels = 1 if native[0] == 1 else 3
        self._shape = (channels or native_channels, *(size or native[1:]))

    @property
    def description(self) -> str:
        labels = f",{self.labels.url}" if self.labels else ""
        return f"npy:{self.images.url}{labels}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def classes(self) -> tuple[str, ...] | None:
        return None

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def splits(self) -> dict[str, int]:
        return {"train": self.images.shape[0]}

    def _rows(self, npy: _NpyFile, start: int, stop: int) -> np.ndarray:
        fs, path = fsspec_filesystem(npy.url, self.storage)
        row = int(np.prod(npy.shape[1:], dtype=np.int64)) * npy.dtype.itemsize
        with fs.open(path, "rb") as file:
            file.seek(npy.offset + start * row)
            data = _read_exact(file, (stop - start) * row, npy.url)
        return np.frombuffer(data, npy.dtype).reshape(stop - start, *npy.shape[1:])

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        if split != "train":
            raise KeyError(split)
        channels, *size = self._shape
        name = self.images.url.rsplit("/", 1)[-1]
        for start, stop in _runs(indices):
            block = self._rows(self.images, start, stop)
            if self.layout == "NHW":
                block = block[..., None]  # (n, H, W) -> (n, H, W, 1)
            elif self.layout == "NCHW":
                block = block.transpose(0, 2, 3, 1)  # (n, C, H, W) -> (n, H, W, C)
            labels = self._rows(self.labels, start, stop) if self.labels else None
            for i in range(stop - start):
                label = int(labels[i]) if labels is not None else None
                yield SourceImage(
                    f"{name}#{start + i}", fit_array(block[i], channels, tuple(size)), label
                )


# ----------------------------------------------------------------------------- splits


class FractionSplit:
    """Carve a "val" split out of a one-split source: a seeded random `val_fraction` of its images.

    The assignment depends only on (number of images, val_fraction, seed), so reruns agree; each
    split keeps the source's order.
    """

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
        self.val_fraction = val_fraction
        self.seed = seed
        ((self._base_split, total),) = splits.items()
        order = np.random.default_rng(seed).permutation(total)
        n_val = int(round(total * val_fraction))
        self._members = {
            "train": np.sort(order[n_val:]),
            "val": np.sort(order[:n_val]),
        }

    @property
    def description(self) -> str:
        return f"{self.base.description} (val_fraction={self.val_fraction}, seed={self.seed})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self.base.classes

    @property
    def has_labels(self) -> bool:
        return self.base.has_labels

    def splits(self) -> dict[str, int]:
        return {name: len(members) for name, members in self._members.items()}

    @property
    def limits(self) -> ImageLimits | None:
        return getattr(self.base, "limits", None)

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        members = self._members[split]
        return self.base.read(self._base_split, [int(members[i]) for i in indices])


# ----------------------------------------------------------------------------- specs


def open_source(
    spec: str,
    storage: StorageConfig | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    limits: ImageLimits | None = None,
) -> ImageSource:
    """A source from a spec: `idx:<folder>`, `folder:<url>`, `npy:<images.npy>[,<labels.npy>]`
    or `webdataset:<brace pattern | prefix | list file | .tar>` (foreign WebDataset shards).

    `idx:` alone means `default_idx_dir()`. Local paths and s3:// URLs both work. `limits` bound
    the image files of folder and webdataset sources (IDX and .npy hold raw pixels of a declared
    shape).
    """
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
        from pipeline.data.webdataset_source import WebDatasetSource

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
