"""Writing shards: format, manifest, reruns that skip verified shards, S3, Ray tasks, errors."""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.images import decode_image, fit_image
from pipeline.data.reader import iter_input
from pipeline.data.shards import (
    Manifest,
    ManifestError,
    PrepareError,
    load_manifest,
    prepare,
    shard_key,
)
from pipeline.data.sources import FolderSource, NpySource, SourceError, open_source
from pipeline.storage import join_url, write_bytes_atomic


def _idx_images(folder, name: str) -> np.ndarray:
    with gzip.open(folder / name) as file:
        return np.frombuffer(file.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def _idx_labels(folder, name: str) -> np.ndarray:
    with gzip.open(folder / name) as file:
        return np.frombuffer(file.read(), np.uint8, offset=8)


def _mtimes(folder) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(folder)
        for f in files
    }


@pytest.fixture
def fmnist(fashion_mnist_dir):
    return open_source(f"idx:{fashion_mnist_dir}")


def test_fashion_mnist_subset_becomes_webdataset_shards_with_a_manifest(
    fmnist, fashion_mnist_dir, tmp_path
):
    result = prepare(fmnist, str(tmp_path / "data"), limit=250, shard_samples=100)
    assert sorted(result.splits) == ["test", "train"]
    manifest = load_manifest(str(tmp_path / "data" / "train"))
    assert manifest.count == 250 and manifest.shape == (1, 28, 28)
    assert [(s.name, s.count, s.start) for s in manifest.shards] == [
        ("shard-000000.tar", 100, 0),
        ("shard-000001.tar", 100, 100),
        ("shard-000002.tar", 50, 200),
    ]
    assert manifest.has_labels and manifest.n_bits == 8 and manifest.dtype == "uint8"
    assert manifest.source == f"idx:{fashion_mnist_dir}"
    # Standard WebDataset: webdataset itself reads the shard, keys and labels as we wrote them.
    shard = str(tmp_path / "data" / "train" / "shard-000001.tar")
    samples = list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [shard_key("train", i) for i in range(100, 200)]
    images = _idx_images(fashion_mnist_dir, "train-images-idx3-ubyte.gz")
    labels = _idx_labels(fashion_mnist_dir, "train-labels-idx1-ubyte.gz")
    for i, sample in enumerate(samples):
        assert int(sample["cls"]) == labels[100 + i]
        np.testing.assert_array_equal(decode_image(sample["png"], (1, 28, 28))[0], images[100 + i])
    test_manifest = result.splits["test"].manifest
    assert test_manifest.count == 250 and test_manifest.shards[0].name == "shard-000000.tar"


def test_manifest_records_sha256_and_size_of_each_shard(fmnist, tmp_path):
    import hashlib

    prepare(fmnist, str(tmp_path), splits=["test"], limit=120, shard_samples=50)
    manifest = load_manifest(str(tmp_path / "test"))
    for info in manifest.shards:
        data = (tmp_path / "test" / info.name).read_bytes()
        assert info.bytes == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
    on_disk = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert on_disk["shape"] == [1, 28, 28] and on_disk["count"] == 120
    assert on_disk["created"].endswith("+00:00")


def test_rerun_writes_nothing_and_repairs_only_what_is_broken(fmnist, tmp_path):
    out = str(tmp_path / "data")
    first = prepare(fmnist, out, splits=["train"], limit=300, shard_samples=100)
    assert first.splits["train"].shards_written == 3
    before = _mtimes(out)
    again = prepare(fmnist, out, splits=["train"], limit=300, shard_samples=100)
    train = again.splits["train"]
    assert (train.shards_written, train.shards_skipped, train.manifest_written) == (0, 3, False)
    assert _mtimes(out) == before
    # A lost shard and a shard with one flipped byte (same size) are rewritten; the third is not.
    os.remove(tmp_path / "data" / "train" / "shard-000000.tar")
    damaged = tmp_path / "data" / "train" / "shard-000002.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    repaired = prepare(fmnist, out, splits=["train"], limit=300, shard_samples=100)
    train = repaired.splits["train"]
    assert (train.shards_written, train.shards_skipped) == (2, 1)
    assert repaired.splits["train"].manifest == first.splits["train"].manifest  # identical bytes
    assert _mtimes(out)["train/shard-000001.tar"] == before["train/shard-000001.tar"]


def test_an_interrupted_prepare_is_completed_and_its_shards_kept(fmnist, tmp_path):
    out = str(tmp_path / "data")
    prepare(fmnist, out, splits=["train"], limit=300, shard_samples=100)
    os.remove(tmp_path / "data" / "train" / "manifest.json")  # as if it died before the end
    with pytest.raises(ManifestError, match="no manifest.json: prepare did not finish"):
        load_manifest(join_url(out, "train"))
    result = prepare(fmnist, out, splits=["train"], limit=300, shard_samples=100)
    train = result.splits["train"]
    assert (train.shards_written, train.shards_skipped) == (0, 3)
    assert load_manifest(join_url(out, "train")).count == 300


def test_prepare_refuses_to_mix_settings_in_one_prefix(fmnist, tmp_path):
    prepare(fmnist, str(tmp_path), splits=["test"], limit=100, shard_samples=50)
    with pytest.raises(PrepareError, match="prepared with other settings") as info:
        prepare(fmnist, str(tmp_path), splits=["test"], limit=100, shard_samples=40)
    assert "new --out" in info.value.hint


def test_shard_bytes_target_sets_the_shard_size(fmnist, tmp_path):
    result = prepare(fmnist, str(tmp_path), splits=["test"], limit=400, shard_bytes=128 * 1024)
    shards = result.splits["test"].manifest.shards
    assert len(shards) > 2
    assert all(0.8 * 128 * 1024 < s.bytes < 1.1 * 128 * 1024 for s in shards[:-1])


def test_s3_shards_are_identical_to_local_ones_and_a_rerun_leaves_them_alone(fmnist, tmp_path, s3):
    local = prepare(fmnist, str(tmp_path), splits=["train"], limit=200, shard_samples=100)
    remote_url = join_url(s3.url, "fmnist")
    remote = prepare(fmnist, remote_url, s3.storage, splits=["train"], limit=200, shard_samples=100)
    assert remote.splits["train"].manifest.shards == local.splits["train"].manifest.shards
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")

    def objects():
        listing = client.list_objects_v2(Bucket=s3.bucket, Prefix="fmnist/")
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing["Contents"]}

    before = objects()
    assert "fmnist/train/manifest.json" in before and "fmnist/train/shard-000001.tar" in before
    assert not any(".tmp" in key for key in before)
    again = prepare(fmnist, remote_url, s3.storage, splits=["train"], limit=200, shard_samples=100)
    assert again.splits["train"].shards_written == 0 and objects() == before
    assert load_manifest(join_url(remote_url, "train"), s3.storage).count == 200


def test_ray_tasks_write_the_same_shards_to_s3(fmnist, tmp_path, s3, ray_local):
    events = []
    local = prepare(fmnist, str(tmp_path), splits=["test"], limit=300, shard_samples=60)
    remote = prepare(
        fmnist,
        join_url(s3.url, "par"),
        s3.storage,
        splits=["test"],
        limit=300,
        shard_samples=60,
        workers=2,
        progress=events.append,
    )
    assert remote.splits["test"].shards_written == 5
    assert remote.splits["test"].manifest.shards == local.splits["test"].manifest.shards
    assert sorted(e.name for e in events) == [f"shard-00000{i}.tar" for i in range(5)]
    assert events[-1].done == 5 and events[-1].images_done == 300


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no data at"),
        ({"shard-000000.tar": b"x"}, "1 shard files but no manifest.json"),
        ({"notes.txt": b"x"}, "holds no manifest.json and no shards"),
        ({"manifest.json": b"{not json"}, "not a valid shard manifest"),
        ({"manifest.json": b'{"split": "train"}'}, "missing required key count"),
    ],
)
def test_load_manifest_explains_what_is_wrong(tmp_path, files, message):
    (tmp_path / "train").mkdir()
    for name, data in files.items():
        (tmp_path / "train" / name).write_bytes(data)
    with pytest.raises(ManifestError, match=message):
        load_manifest(str(tmp_path / "train"))


def test_load_manifest_detects_shards_that_disagree_with_it(fmnist, tmp_path, s3):
    url = join_url(s3.url, "d")
    prepare(fmnist, url, s3.storage, splits=["test"], limit=100, shard_samples=50)
    split = join_url(url, "test")
    write_bytes_atomic(join_url(split, "shard-000009.tar"), b"stray", s3.storage)
    with pytest.raises(ManifestError, match="not in the manifest shard-000009.tar"):
        load_manifest(split, s3.storage)
    write_bytes_atomic(join_url(split, "shard-000001.tar"), b"short", s3.storage)
    with pytest.raises(ManifestError, match="shard-000001.tar has 5 bytes, manifest says"):
        load_manifest(split, s3.storage)
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")
    client.delete_object(Bucket=s3.bucket, Key="d/test/shard-000000.tar")
    with pytest.raises(ManifestError, match="missing shard-000000.tar"):
        load_manifest(split, s3.storage)
    assert isinstance(load_manifest(split, s3.storage, check_shards=False), Manifest)


def test_photo_folder_gives_labelled_rgb_shards(photo_folder, tmp_path):
    source = FolderSource(str(photo_folder), channels=3, size=(32, 32))
    assert source.classes == ("astronaut", "chelsea", "coffee")
    result = prepare(source, str(tmp_path / "out"), shard_samples=8)
    manifest = result.splits["train"].manifest
    assert manifest.count == 18 and manifest.shape == (3, 32, 32)
    assert manifest.classes == ("astronaut", "chelsea", "coffee")
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as archive:
        names = archive.getnames()
        first = archive.extractfile("train-00000000.png").read()
        label = archive.extractfile("train-00000000.cls").read()
    assert names[:2] == ["train-00000000.cls", "train-00000000.png"]
    # astronaut/patch-0.png is 32x32 RGB already: stored exactly, label 0.
    expected = np.asarray(Image.open(photo_folder / "astronaut" / "patch-0.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(first, (3, 32, 32)), expected)
    assert label == b"0"


def test_fit_image_converts_modes_crops_and_resizes(photo_folder):
    grey16 = Image.open(photo_folder / "coffee" / "patch-grey16.png")
    fitted = fit_image(grey16, 3, (16, 24))
    assert fitted.shape == (3, 16, 24) and fitted.dtype == np.uint8
    assert np.array_equal(fitted[0], fitted[1]) and fitted.max() > 100  # scaled, not clipped
    rgba = fit_image(Image.open(photo_folder / "chelsea" / "patch-rgba.png"), 1, (40, 40))
    assert rgba.shape == (1, 40, 40)
    # Centre crop: a 2:1 image fitted to 1:1 keeps its middle half.
    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, 5:15] = 255
    np.testing.assert_array_equal(fit_image(Image.fromarray(wide), 3, (10, 10)), 255)


def test_undecodable_input_fails_or_is_skipped_and_counted(photo_folder, tmp_path):
    (photo_folder / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    source = FolderSource(str(photo_folder), channels=1, size=(24, 24))
    with pytest.raises(PrepareError, match=r"coffee/broken.jpg .*cannot decode image"):
        prepare(source, str(tmp_path / "a"))
    result = prepare(source, str(tmp_path / "b"), on_error="skip")
    manifest = result.splits["train"].manifest
    assert (manifest.count, manifest.skipped_inputs, manifest.shape) == (18, 1, (1, 24, 24))


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npy_arrays_in_any_layout_become_the_same_images(tmp_path, layout):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (30, 3, 12, 10), dtype=np.uint8)
    if layout == "NHW":
        chw = chw[:, :1]
    stored = {"NHW": chw[:, 0], "NHWC": chw.transpose(0, 2, 3, 1), "NCHW": chw}[layout]
    np.save(tmp_path / "images.npy", stored)
    np.save(tmp_path / "labels.npy", np.arange(30) % 4)
    source = open_source(
        f"npy:{tmp_path}/images.npy,{tmp_path}/labels.npy", val_fraction=0.2, seed=3
    )
    result = prepare(source, str(tmp_path / "out"), shard_samples=10)
    assert {s: r.manifest.count for s, r in result.splits.items()} == {"train": 24, "val": 6}
    for split in ("train", "val"):
        seen = {}
        for info in result.splits[split].manifest.shards:
            with tarfile.open(tmp_path / "out" / split / info.name) as archive:
                for member in archive.getmembers():
                    seen.setdefault(member.name.split(".")[0], {})[member.name.split(".")[1]] = (
                        archive.extractfile(member).read()
                    )
        for sample in seen.values():
            index = int(sample["cls"])  # labels were 0..3: find the row by pixels instead
            image = decode_image(sample["png"], chw.shape[1:])
            matches = [i for i in range(30) if np.array_equal(chw[i], image)]
            assert len(matches) == 1 and matches[0] % 4 == index


def test_npy_source_explains_bad_arrays(tmp_path):
    np.save(tmp_path / "float.npy", np.zeros((4, 8, 8), np.float32))
    with pytest.raises(SourceError, match="expected uint8 images, found float32"):
        NpySource(str(tmp_path / "float.npy"))
    np.save(tmp_path / "img.npy", np.zeros((4, 8, 8), np.uint8))
    np.save(tmp_path / "lab.npy", np.zeros(5, np.int64))
    with pytest.raises(SourceError, match=r"expected integer labels of shape \[4\]"):
        NpySource(str(tmp_path / "img.npy"), str(tmp_path / "lab.npy"))


def test_io_benchmark_reports_every_backend_and_column(tmp_path, aws_credentials):
    from pipeline.bench.harness import Run
    from pipeline.bench.shard_io import Settings, measure

    settings = Settings(
        images=60, repeats=1, shard_samples=25, with_ray=False, foreign_images=0, listing_shards=0
    )
    report = measure(settings, Run(tmp_path, tmp_path)).report()
    assert set(report["results"]) == {"local", "s3"}
    for figures in report["results"].values():
        assert set(figures) == {"write", "read_iter", "mb"}
        assert figures["write"] > 0 and figures["read_iter"] > 0 and figures["mb"] > 0
    assert (
        "| local disk |" in report["markdown"] and "| S3 (moto, loopback) |" in report["markdown"]
    )
    assert os.environ["AWS_ACCESS_KEY_ID"] == "flowray-test-key"  # the stand-ins were undone


# ----------------------------------------------------------------------------- kills and temps

_HOLDING_PREPARE = """
import sys, threading
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.data.shards import prepare
from pipeline.data.sources import NpySource


class Holding:
    \"\"\"The .npy source, but after `hold_after` images it says so and waits to be killed.\"\"\"

    def __init__(self, base, hold_after, marker):
        self.base, self.hold_after, self.marker = base, hold_after, marker

    def __getattr__(self, name):
        return getattr(self.base, name)

    def read(self, split, indices):
        for n, item in enumerate(self.base.read(split, indices)):
            if n == self.hold_after:
                Path(self.marker).write_text("holding")
                threading.Event().wait()  # until SIGKILL
            yield item


source = Holding(NpySource({images!r}), hold_after=30, marker={marker!r})
prepare(source, {out!r}, shard_samples=50, shard_bytes=None)  # no size probe: hold in shard 0
"""


def test_a_prepare_killed_mid_shard_leaves_a_temp_that_is_no_shard_and_a_rerun_sweeps(tmp_path):
    """SIGKILL while a shard is half written: the temp left behind is hidden, so no read takes it
    for a shard the manifest does not list, and a rerun removes it (also one named the way a
    killed writer could leave it, `.shard-000000.tar.tmp-<pid>-<id>.tar`)."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline.data.sources import NpySource
    from pipeline.storage import make_temp_file

    images = np.random.default_rng(3).integers(0, 256, (100, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    out, marker = tmp_path / "out", tmp_path / "holding"
    script = _HOLDING_PREPARE.format(
        root=str(Path(__file__).resolve().parents[3]),
        images=str(tmp_path / "x.npy"),
        marker=str(marker),
        out=str(out),
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # the writer is inside shard 0, its temp open
            assert process.poll() is None, "the prepare process ended before holding"
            assert time.monotonic() < deadline, "the prepare process never reached the hold"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    split = out / "train"
    (left,) = os.listdir(split)
    assert left.startswith(".shard-000000.tar.") and left.endswith(".tmp"), left
    # An old-style leftover of a dead writer, and a live writer's temp (this process's own).
    dead = subprocess.Popen(["true"])
    dead.wait()
    old_style = split / f".shard-000001.tar.tmp-{dead.pid}-0a1b2c3d.tar"
    old_style.write_bytes(b"half a shard")
    live = make_temp_file(str(split / "shard-000001.tar"))

    result = prepare(NpySource(str(tmp_path / "x.npy")), str(out), shard_samples=50)
    assert result.splits["train"].shards_written == 2
    assert sorted(os.listdir(split)) == sorted(
        [os.path.basename(live), "_parts", "manifest.json", "shard-000000.tar", "shard-000001.tar"]
    )
    os.remove(live)
    # Byte for byte what an uninterrupted run writes.
    prepare(NpySource(str(tmp_path / "x.npy")), str(tmp_path / "clean"), shard_samples=50)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (split / name).read_bytes() == (tmp_path / "clean" / "train" / name).read_bytes()
    assert len(list(iter_input(str(split), shape=(1, 8, 8)))) == 100
