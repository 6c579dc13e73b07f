"""Image folder trees (JPEG/PNG, local or S3) as an image source for `flowray prepare`.

Re-exported by `pipeline.data.sources`, where `open_source("folder:<url>")` makes one. Each file
is a bad input, not a crash, when it breaks the `ImageLimits` (checked from the listing's size
and the image header, before decoding) or does not decode; a storage fault while fetching it is
retried (`pipeline.data.streams`) and never makes it a bad input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.data.images import BadImage, ImageLimits, decode_fitted
from pipeline.data.source_base import SourceError, SourceImage, check_target
from pipeline.data.streams import RetryPolicy, with_retries
from pipeline.storage import StorageConfig, fsspec_filesystem

__all__ = ["IMAGE_SUFFIXES", "FolderSource"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FolderSource:
    """A tree of JPEG/PNG files, local or on S3, in sorted path order. One split, "train".

    Labels: when every image sits exactly one folder below the root (root/<class>/<file>), the
    sorted folder names are the classes and an image's label is its class's index; otherwise the
    images are unlabelled.
    """

    def __init__(
        self,
        url: str,
        storage: StorageConfig | None = None,
        channels: int | None = None,
        size: tuple[int, int] | None = None,
        limits: ImageLimits | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        check_target(channels, size)
        self.limits = limits or ImageLimits()
        self.retry = retry or RetryPolicy()
        if size is None:
            raise SourceError(
                f"folder source {url}: its images differ in size, so a target size is needed",
                hint="pass --size HxW, e.g. --size 64x64",
            )
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
        if all(f.count("/") == 1 for f in self.files):
            self._classes: tuple[str, ...] | None = tuple(
                sorted({f.split("/")[0] for f in self.files})
            )
        else:
            self._classes = None
        self._shape = (channels or 3, *size)

    @property
    def description(self) -> str:
        return f"folder:{self.url}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self._classes

    @property
    def has_labels(self) -> bool:
        return self._classes is not None

    def splits(self) -> dict[str, int]:
        return {"train": len(self.files)}

    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]:
        if split != "train":
            raise KeyError(split)
        fs, root = fsspec_filesystem(self.url, self.storage)
        class_index = {name: i for i, name in enumerate(self._classes or ())}
        previous = -1
        for index in indices:
            if index <= previous:
                raise ValueError(f"indices must be ascending, found {index} after {previous}")
            previous = index
            relative = self.files[index]
            label = class_index[relative.split("/")[0]] if self._classes else None
            try:
                pixels = self._read_one(fs, f"{root.rstrip('/')}/{relative}", self.sizes[index])
            except BadImage as err:
                # A bad input (undecodable, over a limit), not a fault: the caller's policy decides.
                yield SourceImage(relative, None, label, str(err))
                continue
            yield SourceImage(relative, pixels, label)

    def _read_one(self, fs: Any, path: str, listed_size: int) -> np.ndarray:
        """One file as uint8 [C, H, W]; BadImage for bad inputs. Storage faults are retried and,
        when they last, raised (TransientReadError): they say nothing about the image."""
        self.limits.check_bytes(listed_size)  # before downloading it
        data = with_retries(lambda: fs.cat_file(path), self.retry, path)
        channels, *size = self._shape
        return decode_fitted(data, channels, tuple(size), self.limits).pixels
