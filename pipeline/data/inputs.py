"""What an input names, listed once: a prepared split or foreign WebDataset shards (decided here).

    plan = resolve_input("s3://bucket/photos/{000000..004999}.tar", storage)
    plan.kind                 # "foreign" (or "prepared": a prefix holding manifest.json)
    plan.shards[0]            # ShardRef(url, name="000000.tar", size=..., version="etag:...")
    plan.listing_seconds      # how long the one listing took
    plan.missing              # brace-pattern or list-file shards that do not exist

A spec is one of:
    a prepared split      `<data>/<split>`: a prefix holding manifest.json (as `flowray prepare`
                          writes it); its shards are the manifest's, each ShardRef carrying its
                          manifest entry (`expect`: what the reader checks), sizes and versions
                          from the listing
    a brace pattern       `s3://b/photos/{000000..004999}.tar`, `/data/{a,b}/{0..9}.tar`; several
                          patterns may be joined with "::" (webdataset's convention)
    a prefix              every `*.tar` under it, at any depth, in name order (hidden files and
                          folders, such as writers' temps, are not shards)
    a list file           a text file (local or s3://, not ending in .tar) with one shard URL or
                          brace pattern per line; blank lines and `#` comments are ignored,
                          relative entries are relative to the list file's folder
    one shard             a URL ending in .tar

Listing happens once per resolve: a pattern or a list lists the folders its shards live in (one
folder: one paginated listing; several: one recursive listing of their common folder), never a
HEAD per shard, so 100,000 shards cost about 100 list requests on S3. The size and version of
each shard come from that listing (`streams.version_of`: the ETag on S3, a stat locally). A
consumer records the version it read and reads a shard again when the version changes.

`ShardRef.name` is the shard's path under `plan.root` (the folder before the first brace, the
prefix, or the list file's own folder for a list), so it is unique in the plan and stays the same
while a prefix grows, or a list gains shards in other folders (a shard outside the root is named
by its whole path: `bucket/key` on S3, the absolute path without its leading "/" locally);
`ShardRef.stem` is that name flattened into one file name (for one output file per shard).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from flowmodel.errors import FlowrayError
from pipeline.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    check_shard_files,
    is_shard_file,
    read_manifest,
)
from pipeline.data.streams import version_of
from pipeline.storage import StorageConfig, is_s3, join_url, list_tree, read_bytes


class InputError(FlowrayError, ValueError):
    """A split argument names nothing readable; the message says what was expected and found."""


@dataclass(frozen=True)
class ShardRef:
    """One shard of an input, as the listing saw it, with its manifest entry when it has one."""

    url: str  # full URL: s3://bucket/key or an absolute local path
    name: str  # path under the plan's root; unique in the plan
    size: int  # bytes, from the listing; -1 when a manifest lists it and the listing does not
    version: str  # "etag:<hex>" (S3) or "stat:..." (local; see version_of), from the listing
    expect: ShardInfo | None = None  # a prepared split's manifest entry: what the reader checks

    @property
    def stem(self) -> str:
        return shard_stem(self.name)


def shard_stem(name: str) -> str:
    """`name` without `.tar`, flattened to one file name, reversibly: "a/b/000001.tar" ->
    "a%2Fb%2F000001" ("%" itself becomes "%25", so two names never share a stem)."""
    base = name[:-4] if name.endswith(".tar") else name
    return base.replace("%", "%25").replace("/", "%2F")


@dataclass(frozen=True)
class InputPlan:
    """The shards of one input, listed once (see the module docstring)."""

    spec: str
    kind: Literal["prepared", "foreign"]
    root: str
    shards: tuple[ShardRef, ...]
    listing_seconds: float
    manifest: Manifest | None = None  # prepared splits only
    missing: tuple[str, ...] = ()  # pattern/list URLs that do not exist (foreign only)
    extra: tuple[str, ...] = ()  # prepared: shard files present that the manifest does not list

    def check_shards(self) -> None:
        """Raise ManifestError when a prepared split's shard files, as listed, disagree with its
        manifest (a listed shard missing or of another size, a shard file it does not list);
        foreign inputs have nothing to disagree with."""
        if self.manifest is not None:
            files = {r.name: r.size for r in self.shards if r.size >= 0}
            files |= dict.fromkeys(self.extra, 0)
            check_shard_files(self.manifest, files, join_url(self.root, MANIFEST_NAME))

    def rooted(self, root: str) -> InputPlan | None:
        """This plan with its shards named by their paths under `root` (an output's recorded
        root, so names made under it stay), or None when a shard is not under `root`."""
        prefix = root.rstrip("/") + "/"
        if not all(ref.url.startswith(prefix) for ref in self.shards):
            return None
        shards = tuple(replace(r, name=r.url[len(prefix) :]) for r in self.shards)
        return replace(self, root=root.rstrip("/"), shards=shards)

    def digest(self) -> str:
        """12 hex digits over every shard's URL, size and version: equal digests, same data."""
        listing = "\n".join(f"{r.url} {r.size} {r.version}" for r in self.shards)
        return hashlib.sha256(listing.encode()).hexdigest()[:12]

    def describe(self) -> str:
        """One line for logs: what the spec resolved to and how long listing took."""
        total = sum(ref.size for ref in self.shards)
        what = (
            f"prepared split ({self.manifest.count:,} images {list(self.manifest.shape)})"
            if self.manifest is not None
            else "WebDataset shards"
        )
        missing = f", {len(self.missing)} missing" if self.missing else ""
        return (
            f"{self.spec}: {what}, {len(self.shards):,} shards, {total / 1e6:,.1f} MB{missing}; "
            f"listed in {self.listing_seconds:.2f} s"
        )


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _common_folder(urls: Iterable[str]) -> str:
    folders = {posixpath.dirname(u) for u in urls}
    common = os.path.commonprefix(sorted(folders))
    # Back to a "/" boundary: s3://b/p1 and s3://b/p2 share s3://b, not s3://b/p.
    if not all(f == common or f.startswith(common.rstrip("/") + "/") for f in folders):
        common = common.rsplit("/", 1)[0]
    return common.rstrip("/")


def _relative(url: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return url[len(prefix) :] if url.startswith(prefix) else url.split("://")[-1].lstrip("/")


def _ref(url: str, name: str, info: dict | None, expect: ShardInfo | None = None) -> ShardRef:
    """A shard as its listing entry `info` gives it (None: listed by a manifest alone)."""
    if info is None:
        return ShardRef(url, name, -1, "", expect)
    return ShardRef(url, name, int(info.get("size") or 0), version_of(info), expect)


def _refs(urls: list[str], found: dict[str, dict], root: str) -> tuple[ShardRef, ...]:
    return tuple(_ref(u, _relative(u, root), found[u]) for u in urls if u in found)


def _expand(pattern: str) -> list[str]:
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        return [u for part in pattern.split("::") for u in braceexpand(part.strip())]
    except UnbalancedBracesError as err:
        raise InputError(f"{pattern}: unbalanced braces in the shard pattern ({err})") from err


def _normal(url: str) -> str:
    """`url` in the form listings give: s3://bucket/key, or an absolute local path."""
    url = url.strip()
    if is_s3(url):
        return "s3://" + url.split("://", 1)[1].strip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


def _list_for(urls: list[str], storage: StorageConfig | None) -> tuple[dict[str, dict], str]:
    """The listing that covers `urls` (one folder: that folder; else their common folder,
    recursively), and that folder."""
    folders = {posixpath.dirname(u) for u in urls}
    if len(folders) == 1:
        (folder,) = folders
        return list_tree(folder, storage, recursive=False), folder
    root = _common_folder(urls)
    if root in ("", "/", "s3:", "s3:/", "s3://"):
        raise InputError(
            f"shards in {len(folders)} folders with no common bucket or folder "
            f"({', '.join(sorted(folders)[:3])}, ...)",
            hint="list shards of one bucket, or give one spec per bucket",
        )
    return list_tree(root, storage, recursive=True), root


def _resolve_urls(spec: str, urls: list[str], storage: StorageConfig | None, root: str | None):
    """A foreign plan over the named shard URLs (a pattern's or a list's)."""
    urls = list(dict.fromkeys(_normal(u) for u in urls))  # order kept, duplicates dropped
    not_tar = [u for u in urls if not u.endswith(".tar")]
    if not_tar:
        raise InputError(
            f"{spec}: expected shard URLs ending in .tar, found {not_tar[0]}",
            hint="foreign inputs are WebDataset tar shards (uncompressed .tar)",
        )
    started = time.perf_counter()
    found, listed_root = _list_for(urls, storage)
    seconds = time.perf_counter() - started
    root = _normal(root) if root else _common_folder(urls) or listed_root
    refs = _refs(urls, found, root)
    if not refs:
        raise InputError(
            f"{spec}: none of its {len(urls):,} shards exists (first: {urls[0]})",
            hint="check the pattern, the bucket and --endpoint-url",
        )
    missing = tuple(u for u in urls if u not in found)
    return InputPlan(spec, "foreign", root, refs, seconds, missing=missing)


def _pattern_root(pattern: str) -> str:
    """The folder before the first brace: s3://b/photos/{000..009}.tar -> s3://b/photos."""
    head = pattern.split("::")[0]
    return head[: head.index("{")].rsplit("/", 1)[0] if "{" in head else posixpath.dirname(head)


def _read_list(spec: str, storage: StorageConfig | None) -> list[str]:
    try:
        text = read_bytes(spec, storage).decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{spec}: a list file is text, one shard URL per line ({err})") from err
    folder = posixpath.dirname(_normal(spec))
    urls = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        absolute = is_s3(line) or line.startswith(("/", "file://", "~"))
        urls.extend(_expand(line if absolute else join_url(folder, line)))
    if not urls:
        raise InputError(f"{spec}: the list file names no shards (one URL per line expected)")
    return urls


def _prepared(spec: str, root: str, found: dict[str, dict], seconds: float, storage) -> InputPlan:
    manifest = read_manifest(join_url(root, MANIFEST_NAME), storage)
    present = {_relative(u, root): info for u, info in found.items()}
    refs = tuple(
        _ref(join_url(root, info.name), info.name, present.get(info.name), info)
        for info in manifest.shards
    )
    listed = {info.name for info in manifest.shards}
    extra = sorted(n for n in present if "/" not in n and is_shard_file(n) and n not in listed)
    return InputPlan(spec, "prepared", root, refs, seconds, manifest=manifest, extra=tuple(extra))


def _from_prefix(spec: str, storage: StorageConfig | None) -> InputPlan:
    root = _normal(spec)
    started = time.perf_counter()
    found = list_tree(root, storage, recursive=True)
    seconds = time.perf_counter() - started
    if root in found:  # the spec is a file: one shard, or a list of them
        if root.endswith(".tar"):
            refs = _refs([root], found, posixpath.dirname(root))
            return InputPlan(spec, "foreign", posixpath.dirname(root), refs, seconds)
        # Named under the list's own folder, which no listed URL moves (their common folder
        # would move up as soon as a line names another folder, renaming every shard).
        return _resolve_urls(spec, _read_list(spec, storage), storage, posixpath.dirname(root))
    relative = {_relative(u, root): u for u in found}
    if MANIFEST_NAME in relative:
        return _prepared(spec, root, found, seconds, storage)
    nested = sorted(r for r in relative if r.endswith("/" + MANIFEST_NAME) and not _is_hidden(r))
    if nested:
        splits = ", ".join(r.rsplit("/", 1)[0] for r in nested[:4])
        raise InputError(
            f"{spec} holds prepared splits ({splits}), not one input",
            hint=f"pass one split, e.g. {join_url(spec, nested[0].rsplit('/', 1)[0])}",
        )
    tars = sorted(r for r in relative if r.endswith(".tar") and not _is_hidden(r))
    if not tars:
        raise InputError(
            f"no data at {spec}: expected {MANIFEST_NAME} (a prepared split), *.tar shards, "
            f"or a list file (found {len(found)} other files)",
            hint="pass <data>/<split> written by `flowray prepare`, a brace pattern such as "
            "s3://bucket/photos/{000000..000099}.tar, a prefix of .tar shards or a list file",
        )
    refs = _refs([relative[r] for r in tars], found, root)
    return InputPlan(spec, "foreign", root, refs, seconds)


def resolve_input(spec: str, storage: StorageConfig | None = None) -> InputPlan:
    """What `spec` names, listed once (see the module docstring).

    Raises:
        InputError: nothing readable at `spec` (no manifest, no shards, none of a pattern's
            shards exists, several prepared splits under one prefix, unbalanced braces).
        ManifestError: a prepared split's manifest is invalid.
        StorageError: the storage cannot be reached.
    """
    spec = spec.strip()
    if not spec:
        raise InputError(
            "an input is required: a prepared split, a shard pattern, a prefix or a list"
        )
    if "{" in spec or "}" in spec or "::" in spec:
        return _resolve_urls(spec, _expand(spec), storage, _pattern_root(spec))
    return _from_prefix(spec, storage)
