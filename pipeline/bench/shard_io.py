"""Shard I/O, local disk against S3 on loopback (images/s):

- prepared shards: `images` Fashion-MNIST images (random ones without the IDX files) written by
  `prepare` to a fresh prefix per repeat, read back by `iter_input` and (`with_ray`) Ray Data.
- foreign shards: JPEG photos (as img2dataset-style tools store them) written by webdataset's
  ShardWriter with .json and .txt beside each, read in place and fitted to 3x64x64, next to the
  same images re-sharded by `prepare` into 64x64 PNG shards. Reads repeat min(repeats, 2) times.
- listing: `resolve_input` over many tiny shards, as a prefix and as a brace pattern.

The S3 endpoint is moto in this process: it shares the GIL with the client, so its figures are a
lower bound for the client-side cost of the S3 code path; moto answers a 1000-key listing page in
about a second on a loaded 2-core machine (AWS S3 in tens of ms): the S3 listing is mostly moto's.
"""

from __future__ import annotations

import io
import json
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table
from pipeline.data.inputs import resolve_input
from pipeline.data.reader import iter_input, read_input
from pipeline.data.shards import ImageSource, prepare
from pipeline.data.sources import NpySource, SourceError, open_source
from pipeline.storage import StorageConfig, fsspec_filesystem, join_url

SHAPE = (3, 64, 64)  # what foreign shards are fitted to
PER_SHARD = 250  # JPEG photos per foreign shard
# (height, width) of the photos, cycled: what web-scale image shards typically hold.
PHOTO_SIZES = ((256, 256), (240, 320), (320, 240), (384, 512))
BACKENDS = {"local": "local disk", "s3": "S3 (moto, loopback)"}


@dataclass(frozen=True)
class Settings:
    images: int = 4000  # written and read per run (0: skip the prepared shards)
    repeats: int = 3  # runs per backend; medians reported
    shard_samples: int = 500  # images per prepared shard
    with_ray: bool = True  # also read through Ray Data
    foreign_images: int = 500  # JPEG photos in the foreign-shard runs (0: skip them)
    listing_shards: int = 10_000  # tiny shards listed on local disk (0: skip)
    listing_s3_shards: int | None = None  # on S3 (None: as many as on local disk; 0: skip)


SMOKE = {
    "images": 200,
    "repeats": 1,
    "shard_samples": 100,
    "foreign_images": 100,
    "listing_shards": 200,
}


@dataclass(frozen=True)
class _Where:
    """One backend: where its shards go, its storage, and the Ray read tasks' remote args."""

    root: str
    storage: StorageConfig | None
    remote_args: dict[str, Any] | None


def _source(images: int, workdir: Path) -> ImageSource:
    try:
        return open_source("idx:")
    except SourceError:
        pixels = np.random.default_rng(0).integers(0, 256, (images, 28, 28), dtype=np.uint8)
        np.save(workdir / "bench-images.npy", pixels)
        return NpySource(str(workdir / "bench-images.npy"))


def _reads(
    spec: str, shape: tuple[int, int, int], where: _Where, repeats: int, ray: bool
) -> dict[str, float]:
    """Images/s of `spec` read with iter_input and (with Ray) read_input through Ray Data."""

    def plain() -> int:
        return sum(1 for _ in iter_input(spec, where.storage, shape=shape))

    def through_ray() -> int:
        dataset = read_input(spec, where.storage, shape=shape, ray_remote_args=where.remote_args)
        return sum(len(batch["key"]) for batch in dataset.iter_batches(batch_size=256))

    readers = {"iter": plain, **({"ray": through_ray} if ray else {})}
    runs = {name: [harness.timed(read) for _ in range(repeats)] for name, read in readers.items()}
    return {
        name: harness.median([count / seconds for seconds, count in r]) for name, r in runs.items()
    }


def _prepared(
    source: ImageSource, backends: dict[str, _Where], settings: Settings
) -> dict[str, Any]:
    """The images, their source and {backend: {"write", "read_iter", ["read_ray"], "mb"}}:
    medians over `repeats`."""
    split = next(iter(source.splits()))
    images = min(settings.images, source.splits()[split])
    list(source.read(split, range(min(images, 64))))  # warm-up: decompress
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
    megabytes: dict[str, float] = {}
    options = {"splits": [split], "limit": images, "shard_samples": settings.shard_samples}
    for repeat in range(settings.repeats):
        for name, where in backends.items():
            out = join_url(where.root, f"run-{repeat}")
            seconds, written = harness.timed(
                partial(prepare, source, out, where.storage, **options)
            )
            result = written.splits[split]
            megabytes[name] = sum(s.bytes for s in result.manifest.shards) / 1e6
            reads = _reads(join_url(out, split), source.shape, where, 1, settings.with_ray)
            figures = {"write": result.images_written / seconds}
            figures |= {f"read_{reader}": value for reader, value in reads.items()}
            samples[name].append(figures)
    results = {
        name: harness.medians(runs) | {"mb": megabytes[name]} for name, runs in samples.items()
    }
    return {"images": images, "source": source.description, "results": results}


def _photos(count: int) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of `count` photo patches, 256x256 to 512x384, quality 90 (random pixels
    without scikit-image)."""
    from PIL import Image

    try:
        from skimage import data

        sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except ImportError:
        sources = [np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)]
    photos = []
    for i in range(count):
        source = sources[i % len(sources)]
        height, width = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        height, width = min(height, source.shape[0]), min(width, source.shape[1])
        top = (31 * i) % (source.shape[0] - height + 1)
        left = (47 * i) % (source.shape[1] - width + 1)
        buffer = io.BytesIO()
        patch = np.ascontiguousarray(source[top : top + height, left : left + width])
        Image.fromarray(patch).save(buffer, format="JPEG", quality=90)
        photos.append((f"{i:09d}", buffer.getvalue()))
    return photos


def _write_foreign(folder: Path, photos: list[tuple[str, bytes]]) -> list[Path]:
    """The photos as webdataset.ShardWriter writes them: jpg + json + txt per sample."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for key, jpeg in photos:
            meta = json.dumps({"key": key, "bytes": len(jpeg)}).encode()
            sink.write({"__key__": key, "jpg": jpeg, "json": meta, "txt": f"photo {key}"})
    return sorted(folder.glob("*.tar"))


def _foreign(base: Path, backends: dict[str, _Where], settings: Settings) -> dict[str, Any]:
    """Foreign JPEG shards against prepared PNG shards, images/s per backend (medians)."""
    paths = _write_foreign(base / "foreign-jpeg", _photos(settings.foreign_images))
    repeats, results = min(settings.repeats, 2), {}
    for name, where in backends.items():
        foreign, storage = str(base / "foreign-jpeg"), where.storage
        out = join_url(where.root, "foreign-prepared")
        if storage is not None:
            foreign = join_url(where.root, "foreign")
            for path in paths:
                fs, key = fsspec_filesystem(join_url(foreign, path.name), storage)
                fs.put_file(str(path), key)
        source = open_source(f"webdataset:{foreign}", storage, channels=3, size=SHAPE[1:])
        reshard = partial(prepare, source, out, storage, shard_samples=PER_SHARD, shard_bytes=None)
        seconds, written = harness.timed(reshard)
        manifest = written.splits["train"].manifest
        in_place = _reads(foreign, SHAPE, where, repeats, settings.with_ray)
        png = _reads(join_url(out, "train"), SHAPE, where, repeats, settings.with_ray)
        results[name] = {
            "reshard": manifest.count / seconds,
            **{f"foreign_{k}": v for k, v in in_place.items()},
            **{f"prepared_{k}": v for k, v in png.items()},
            "jpeg_mb": sum(p.stat().st_size for p in paths) / 1e6,
            "png_mb": sum(s.bytes for s in manifest.shards) / 1e6,
        }
    return {"images": settings.foreign_images, "per_shard": PER_SHARD, "results": results}


def _tiny_shards(prefix: str, count: int, storage: StorageConfig | None) -> None:
    """`count` empty tars under `prefix`; on S3 put through moto's backend (thousands of PUTs over
    HTTP would cost minutes and measure nothing of ours); the listing still goes over HTTP."""
    empty = b"\0" * 1024  # an empty tar: its two end-of-archive blocks
    if storage is None:
        Path(prefix).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (Path(prefix) / f"{i:06d}.tar").write_bytes(empty)
        return
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    key = prefix.split("://", 1)[1].split("/", 1)[1]
    for i in range(count):
        backend.put_object(harness.BENCH_BUCKET, f"{key}/{i:06d}.tar", empty)


def _listing(backends: dict[str, _Where], counts: dict[str, int]) -> dict[str, Any]:
    results = {}
    for name, where in backends.items():
        count = counts[name]
        if not count:
            continue
        prefix = join_url(where.root, "tiny")
        _tiny_shards(prefix, count, where.storage)
        pattern = join_url(prefix, f"{{000000..{count - 1:06d}}}.tar")
        figures = {}
        for key, spec in (("prefix_s", prefix), ("pattern_s", pattern)):
            plan = resolve_input(spec, where.storage)
            if len(plan.shards) != count:
                raise RuntimeError(
                    f"{spec}: expected {count} shards listed, found {len(plan.shards)}"
                )
            figures[key] = plan.listing_seconds
        results[name] = {"shards": count, **figures}
    return {"shards": max(counts.values()), "results": results}


def measure(settings: Settings, run: Run) -> Result:
    base = run.workdir / f"io-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    report: dict[str, Any] = {"repeats": settings.repeats, "shard_samples": settings.shard_samples}
    with ExitStack() as stack:
        s3 = stack.enter_context(harness.loopback_s3())  # before Ray starts: its workers inherit it
        started = settings.with_ray and stack.enter_context(harness.local_ray())
        # A Ray already running lacks the stand-in credentials: the read tasks get them.
        remote = (
            None if started else {"runtime_env": {"env_vars": dict(harness.FAKE_S3_CREDENTIALS)}}
        )
        backends = {
            "local": _Where(str(base / "local"), None, None),
            # A prefix of its own: moto keeps one store per process, whatever the server.
            "s3": _Where(f"s3://{harness.BENCH_BUCKET}/{base.name}", s3, remote),
        }
        if settings.images:
            report |= _prepared(_source(settings.images, base), backends, settings)
        if settings.foreign_images:
            report["foreign"] = _foreign(base, backends, settings)
        local, s3_shards = settings.listing_shards, settings.listing_s3_shards
        counts = {"local": local, "s3": local if s3_shards is None else s3_shards}
        if any(counts.values()):
            report["listing"] = _listing(backends, counts)
    return Result(report, _tables(report))


def _backend_table(
    results: dict[str, dict[str, Any]], rates: dict[str, str], sizes: dict[str, str], note: str
) -> Table:
    """A row per backend: the `rates` it has (images/s, whole numbers), `sizes` (MB, one decimal)."""
    shown = [key for key in rates if key in results["local"]]
    rows = [
        [BACKENDS[name], *(f"{f[k]:,.0f}" for k in shown), *(f"{f[k]:.1f}" for k in sizes)]
        for name, f in results.items()
    ]
    return Table(["storage", *(rates[key] for key in shown), *sizes.values()], rows, [note])


def _tables(report: dict[str, Any]) -> list[Table]:
    tables = []
    if "results" in report:
        rates = {"write": "write", "read_iter": "read (iter_input)", "read_ray": "read (Ray Data)"}
        tables.append(
            _backend_table(
                report["results"],
                {key: f"{header} images/s" for key, header in rates.items()},
                {"mb": "shards MB"},
                f"{report['images']} images from {report['source']}, "
                f"{report['shard_samples']} per shard, median of {report['repeats']} runs.",
            )
        )
    if "foreign" in report:
        foreign = report["foreign"]
        rates = {
            "foreign_iter": "JPEG in place (iter)",
            "prepared_iter": "64x64 PNG prepared (iter)",
            "foreign_ray": "JPEG in place (Ray Data)",
            "prepared_ray": "PNG prepared (Ray Data)",
            "reshard": "re-shard (prepare)",
        }
        note = (
            f"images/s: {foreign['images']} JPEG photos (256x256 to 384x512, quality 90) in shards "
            f"of {foreign['per_shard']}, decoded and fitted to 3x64x64 in place, versus the same "
            "images prepared as 3x64x64 PNG shards; re-shard is prepare's rate."
        )
        sizes = {"jpeg_mb": "JPEG MB", "png_mb": "PNG MB"}
        tables.append(_backend_table(foreign["results"], rates, sizes, note))
    if "listing" in report:
        listing = report["listing"]
        tables.append(
            Table(
                ["storage", "shards", "list a prefix (s)", "list a brace pattern (s)"],
                [
                    [BACKENDS[name], f["shards"], f"{f['prefix_s']:.2f}", f"{f['pattern_s']:.2f}"]
                    for name, f in listing["results"].items()
                ],
                [f"resolve_input over {listing['shards']:,} tiny shards: one listing each."],
            )
        )
    return tables
