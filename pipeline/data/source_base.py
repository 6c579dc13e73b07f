"""What every image source is: the `ImageSource` contract, its items, its errors.

Split out of `pipeline.data.sources` (which re-exports all of it) so that source modules such as
`pipeline.data.folders` can share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from pipeline.errors import FlowrayError

__all__ = ["ImageSource", "SourceError", "SourceImage", "check_target"]


class SourceError(FlowrayError, ValueError):
    """A source cannot be read as asked; the message says what was expected and what was found."""


class SourceImage(NamedTuple):
    key: str
    image: np.ndarray | None  # uint8 [C, H, W]; None when `error` is set
    label: int | None
    error: str | None = None


class ImageSource(Protocol):
    @property
    def description(self) -> str: ...
    @property
    def shape(self) -> tuple[int, int, int]: ...
    @property
    def classes(self) -> tuple[str, ...] | None: ...
    @property
    def has_labels(self) -> bool: ...
    def splits(self) -> dict[str, int]: ...
    def read(self, split: str, indices: Sequence[int]) -> Iterator[SourceImage]: ...


def check_target(channels: int | None, size: tuple[int, int] | None) -> None:
    if channels is not None and channels not in (1, 3):
        raise SourceError(f"channels: expected 1 or 3, found {channels}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise SourceError(f"size: expected (height, width) of positive integers, found {size}")
