"""Resolving inputs: a brace pattern, a prefix and a list file name the same shards with the same
sizes and versions, on local disk and on S3; missing shards, rewritten shards, prepared splits
and what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.inputs import InputError, InputPlan, resolve_input, shard_stem
from pipeline.data.shards import prepare
from pipeline.data.sources import open_source
from pipeline.storage import StorageConfig, fsspec_filesystem, join_url
from tests.pipeline.data.foreign_shards import make_photos, upload, write_shards


def _shards(tmp_path: Path, where: str, request) -> tuple[str, StorageConfig | None, list[str]]:
    """4 foreign shards (13 photos, 4 per shard) plus files that are not shards beside them;
    their prefix, storage and URLs."""
    local = write_shards(tmp_path / "photos", make_photos(13), per_shard=4)
    (tmp_path / "photos" / "README.txt").write_text("not a shard")
    (tmp_path / "photos" / ".000009.tar.abc-1-2.tmp").write_bytes(b"a writer's temp")
    if where == "local":
        return str(tmp_path / "photos"), None, [str(p) for p in local]
    s3 = request.getfixturevalue("s3")
    prefix = join_url(s3.url, "photos")
    urls = upload(local, prefix, s3.storage)
    upload([tmp_path / "photos" / "README.txt"], prefix, s3.storage)
    return prefix, s3.storage, urls


def _described(plan: InputPlan) -> list[tuple[str, str, int, str]]:
    return [(r.url, r.name, r.size, r.version) for r in plan.shards]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pattern_prefix_and_list_file_give_the_same_plan(tmp_path, request, where):
    prefix, storage, urls = _shards(tmp_path, where, request)
    listing = "# today's drop\n000000.tar\n\n" + "\n".join(urls[1:]) + "\n"
    list_url = join_url(prefix, "lists", "today.txt")
    fs, path = fsspec_filesystem(list_url, storage)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, listing.encode())
    # The list lives one folder down: its relative entry is relative to that folder.
    fs.pipe_file(
        fs._parent(path) + "/000000.tar", fs.cat_file(fsspec_filesystem(urls[0], storage)[1])
    )

    by_pattern = resolve_input(join_url(prefix, "{000000..000003}.tar"), storage)
    by_prefix = resolve_input(prefix, storage)
    by_list = resolve_input(list_url, storage)

    expected_names = ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]
    assert [r.name for r in by_pattern.shards] == expected_names
    assert [r.url for r in by_pattern.shards] == urls
    sizes = [fsspec_filesystem(u, storage)[0].size(fsspec_filesystem(u, storage)[1]) for u in urls]
    assert [r.size for r in by_pattern.shards] == sizes
    prefix_refs = [r for r in by_prefix.shards if "/" not in r.name]  # lists/000000.tar aside
    assert [(r.url, r.name, r.size, r.version) for r in prefix_refs] == _described(by_pattern)
    assert [r.url for r in by_list.shards][1:] == urls[1:]
    assert [(r.size, r.version) for r in by_list.shards[1:]] == [
        (r.size, r.version) for r in by_pattern.shards[1:]
    ]
    assert by_list.shards[0].url == join_url(prefix, "lists", "000000.tar")
    prefix_of_first = "etag:" if where == "s3" else "stat:"
    for plan in (by_pattern, by_prefix, by_list):
        assert plan.kind == "foreign" and plan.missing == () and plan.manifest is None
        assert plan.listing_seconds > 0
        assert all(r.version.startswith(prefix_of_first) for r in plan.shards)


def test_a_prefix_lists_shards_in_sub_folders_by_their_path(tmp_path):
    write_shards(tmp_path / "drops" / "2026-11-28", make_photos(3), per_shard=2)
    write_shards(tmp_path / "drops" / "2026-11-29", make_photos(2), per_shard=2)
    (tmp_path / "drops" / ".hidden").mkdir()
    (tmp_path / "drops" / ".hidden" / "000000.tar").write_bytes(b"not ours")
    plan = resolve_input(str(tmp_path / "drops"))
    assert [r.name for r in plan.shards] == [
        "2026-11-28/000000.tar",
        "2026-11-28/000001.tar",
        "2026-11-29/000000.tar",
    ]
    assert plan.root == str(tmp_path / "drops")
    assert [r.stem for r in plan.shards] == [
        "2026-11-28%2F000000",
        "2026-11-28%2F000001",
        "2026-11-29%2F000000",
    ]


def test_shard_stems_are_flat_and_never_shared():
    assert shard_stem("000001.tar") == "000001"
    assert shard_stem("a/b/000001.tar") == "a%2Fb%2F000001"
    assert shard_stem("a%2Fb/000001.tar") == "a%252Fb%2F000001"
    assert shard_stem("a/b%2F000001.tar") != shard_stem("a/b/000001.tar")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_pattern_names_its_missing_shards(tmp_path, request, where):
    prefix, storage, urls = _shards(tmp_path, where, request)
    plan = resolve_input(join_url(prefix, "{000002..000005}.tar"), storage)
    assert [r.url for r in plan.shards] == urls[2:]
    assert plan.missing == (join_url(prefix, "000004.tar"), join_url(prefix, "000005.tar"))
    with pytest.raises(InputError, match="none of its 2 shards exists"):
        resolve_input(join_url(prefix, "{000007..000008}.tar"), storage)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rewritten_shard_gets_another_version(tmp_path, request, where):
    prefix, storage, urls = _shards(tmp_path, where, request)
    before = resolve_input(prefix, storage)
    replacement = write_shards(tmp_path / "again", make_photos(5)[1:], per_shard=4)[0]
    fs, path = fsspec_filesystem(urls[1], storage)
    fs.put_file(str(replacement), path)
    if where == "local":  # a later mtime whatever the clock's resolution
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = resolve_input(prefix, storage)
    changed = [a.name for a, b in zip(after.shards, before.shards) if a.version != b.version]
    assert changed == ["000001.tar"]
    assert after.digest() != before.digest() == before.digest()
    assert resolve_input(prefix, storage).digest() == after.digest()


def test_a_prepared_split_resolves_to_its_manifest_and_listing(tmp_path):
    write_shards(tmp_path / "photos", make_photos(9), per_shard=4)
    source = open_source(f"webdataset:{tmp_path / 'photos'}", size=(16, 16))
    result = prepare(source, str(tmp_path / "data"), shard_samples=4)
    manifest = result.splits["train"].manifest
    plan = resolve_input(str(tmp_path / "data" / "train"))
    assert plan.kind == "prepared" and plan.manifest == manifest
    assert [(r.name, r.size) for r in plan.shards] == [(i.name, i.bytes) for i in manifest.shards]
    assert plan.shards[0].url == str(tmp_path / "data" / "train" / "shard-000000.tar")
    with pytest.raises(InputError, match="holds prepared splits") as refused:
        resolve_input(str(tmp_path / "data"))
    assert "train" in refused.value.hint


def test_nothing_readable_is_refused_with_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="expected manifest.json"):
        resolve_input(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="unbalanced braces"):
        resolve_input(str(tmp_path / "{000..001.tar"))
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n")
    with pytest.raises(InputError, match="names no shards"):
        resolve_input(str(listing))
    listing.write_text("photos/000000.jpg\n")
    with pytest.raises(InputError, match="ending in .tar"):
        resolve_input(str(listing))


def _rewrite_keeping_mtime(path: Path, replacement: bytes, how: str) -> None:
    """`path` given other bytes of its size and its old mtime, as `cp -p`/`touch -r` (in place)
    or `rsync -a`/`tar x` (a new file renamed over it) leave it."""
    old = os.stat(path)
    if how == "in place":
        with open(path, "r+b") as file:
            file.write(replacement)
    else:
        temp = path.with_name(".incoming.tmp")
        temp.write_bytes(replacement)
        os.replace(temp, path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_local_shard_rewritten_with_its_old_mtime_and_size_gets_another_version(tmp_path, how):
    paths = write_shards(tmp_path / "photos", make_photos(8), per_shard=4)
    before = resolve_input(str(tmp_path / "photos"))
    assert resolve_input(str(tmp_path / "photos")).shards == before.shards  # unchanged: equal
    data = paths[1].read_bytes()
    _rewrite_keeping_mtime(paths[1], data[:-1024] + b"\x01" * 1024, how)
    after = resolve_input(str(tmp_path / "photos"))
    assert [r.size for r in after.shards] == [r.size for r in before.shards]
    changed = [a.name for a, b in zip(after.shards, before.shards) if a.version != b.version]
    assert changed == ["000001.tar"]
    stat = os.stat(paths[1])
    assert after.shards[1].version == (
        f"stat:{stat.st_mtime_ns}/{stat.st_ctime_ns}/{stat.st_size}/{stat.st_ino}"
    )


def test_a_list_file_names_its_shards_the_same_when_they_spread_to_another_folder(tmp_path):
    write_shards(tmp_path / "drops" / "a", make_photos(4), per_shard=2)
    write_shards(tmp_path / "drops" / "b", make_photos(2), per_shard=2)
    listing = tmp_path / "lists" / "nightly.txt"
    listing.parent.mkdir()
    listing.write_text(f"{tmp_path}/drops/a/{{000000..000001}}.tar\n")
    first = resolve_input(str(listing))
    listing.write_text(listing.read_text() + f"{tmp_path}/drops/b/000000.tar\n")
    second = resolve_input(str(listing))
    assert first.root == second.root == str(tmp_path / "lists")
    assert [r.name for r in second.shards[:2]] == [r.name for r in first.shards]
    assert [r.stem for r in second.shards[:2]] == [r.stem for r in first.shards]
    assert len({r.stem for r in second.shards}) == 3
    # A list beside its shards names them by file name, as a prefix does.
    beside = tmp_path / "drops" / "a" / "list.txt"
    beside.write_text("000000.tar\n000001.tar\n")
    assert [r.name for r in resolve_input(str(beside)).shards] == ["000000.tar", "000001.tar"]


def test_a_plan_named_under_a_recorded_root_keeps_the_names_made_under_it(tmp_path):
    write_shards(tmp_path / "drops" / "a", make_photos(4), per_shard=2)
    listing = tmp_path / "lists" / "nightly.txt"
    listing.parent.mkdir()
    listing.write_text(f"{tmp_path}/drops/a/{{000000..000001}}.tar\n")
    plan = resolve_input(str(listing))
    rooted = plan.rooted(str(tmp_path / "drops" / "a"))
    assert rooted is not None and rooted.root == str(tmp_path / "drops" / "a")
    assert [r.name for r in rooted.shards] == ["000000.tar", "000001.tar"]
    assert [(r.url, r.version) for r in rooted.shards] == [(r.url, r.version) for r in plan.shards]
    assert plan.rooted(str(tmp_path / "drops" / "b")) is None
