"""A prepared split's manifest: what it holds, and how it is checked against the files present.

    <out>/<split>/manifest.json    `Manifest`: count, shape, labels, and per shard its name,
                                   sample count, size and sha256 (`ShardInfo`)

Written last by `pipeline.data.shards.prepare`, atomically, so a manifest present means every
shard it lists was complete when it was written. `load_manifest` reads it and (by default)
refuses a split whose files disagree with it; the readers compare it shard by shard instead
(see `pipeline.data.reader`). Hidden files (temps) are never shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from flowmodel.typed import ConfigError, from_dict
from pipeline.errors import FlowrayError
from pipeline.storage import StorageConfig, join_url, list_files, read_bytes

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ShardDiff",
    "ShardInfo",
    "compare_shards",
    "load_manifest",
    "parse_manifest",
    "shard_key",
    "shard_name",
]

FORMAT = "flowray-shards/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(FlowrayError, ValueError):
    """A split's manifest is missing, invalid or disagrees with the shards present."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it. `start` is the split index of its first key."""

    name: str
    count: int
    sha256: str
    bytes: int
    start: int = 0


@dataclass(frozen=True)
class Manifest:
    """What a split holds; parsed with `flowmodel.typed.from_dict`, so unknown keys are refused."""

    split: str
    count: int
    shape: tuple[int, int, int]  # [C, H, W]
    shards: tuple[ShardInfo, ...]
    source: str
    created: str  # ISO 8601, UTC
    fingerprint: str  # hash of everything that decides the shards' content
    has_labels: bool = False
    classes: tuple[str, ...] | None = None
    dtype: str = "uint8"
    n_bits: int = 8
    encoding: str = "png"
    skipped_inputs: int = 0  # source images that could not be decoded (on_error="skip")
    format: str = FORMAT

    def shard(self, name: str) -> ShardInfo:
        for info in self.shards:
            if info.name == name:
                return info
        raise KeyError(f"no shard {name!r} in the manifest of split {self.split!r}")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


@dataclass(frozen=True)
class ShardDiff:
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    wrong_size: tuple[tuple[str, int, int], ...]  # (name, bytes found, bytes expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.wrong_size)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing {_few(self.missing)}")
        if self.extra:
            parts.append(f"not in the manifest {_few(self.extra)}")
        for name, found, expected in self.wrong_size[:3]:
            parts.append(f"{name} has {found} bytes, manifest says {expected}")
        return "; ".join(parts)


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_shard_file(name: str) -> bool:
    # Hidden files are never shards: temps (".shard-000001.tar.<host>-<pid>-<id>.tmp") and the
    # ".tar"-ending temps that earlier versions left behind after a kill.
    return name.endswith(".tar") and not name.startswith(".")


def compare_shards(manifest: Manifest, files: dict[str, int]) -> ShardDiff:
    """Shards the manifest lists versus the `.tar` files present ({name: size}); hidden files
    (temps) are not shards."""
    listed = {info.name: info for info in manifest.shards}
    present = {name: size for name, size in files.items() if _is_shard_file(name)}
    return ShardDiff(
        missing=tuple(sorted(set(listed) - set(present))),
        extra=tuple(sorted(set(present) - set(listed))),
        wrong_size=tuple(
            (name, present[name], info.bytes)
            for name, info in sorted(listed.items())
            if name in present and present[name] != info.bytes
        ),
    )


def parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        manifest = from_dict(Manifest, json.loads(data))
    except (ConfigError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{where} is not a valid shard manifest: {err}") from err
    if manifest.format != FORMAT:
        raise ManifestError(f"{where}: expected format {FORMAT}, found {manifest.format}")
    if sum(info.count for info in manifest.shards) != manifest.count:
        raise ManifestError(f"{where}: shard counts do not add up to count={manifest.count}")
    return manifest


def load_manifest(
    split_url: str, storage: StorageConfig | None = None, *, check_shards: bool = True
) -> Manifest:
    """The manifest of the split at `split_url`, checked against the shards present.

    Raises:
        ManifestError: the prefix is empty; it has shards but no manifest (prepare did not
            finish); the manifest is invalid; or (check_shards) a listed shard is missing, has
            another size, or a shard file is not listed.
        StorageError: the storage cannot be reached.
    """
    files = list_files(split_url, storage)
    if not files:
        raise ManifestError(
            f"no data at {split_url}: expected {MANIFEST_NAME} and shard-*.tar files",
            hint="run `flowray prepare --out <data>` first and pass <data>/<split>, e.g. .../train",
        )
    if MANIFEST_NAME not in files:
        tars = [n for n in files if _is_shard_file(n)]
        if tars:
            raise ManifestError(
                f"{split_url} has {len(tars)} shard files but no {MANIFEST_NAME}: "
                "prepare did not finish",
                hint="rerun `flowray prepare` with the same options; it completes what is missing",
            )
        raise ManifestError(
            f"{split_url} holds no {MANIFEST_NAME} and no shards (found {_few(sorted(files))})",
            hint="pass a split folder written by `flowray prepare`, e.g. <data>/train",
        )
    where = join_url(split_url, MANIFEST_NAME)
    manifest = parse_manifest(read_bytes(where, storage), where)
    if check_shards:
        diff = compare_shards(manifest, files)
        if diff:
            raise ManifestError(
                f"{where} disagrees with the shards present: {diff.describe()}",
                hint="rerun `flowray prepare` with the same options to repair missing shards",
            )
    return manifest
