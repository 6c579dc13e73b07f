"""The io suite's foreign-shard half (run by `pipeline.bench.shard_io`): JPEG shards read in place
with decode + fit to 3x64x64, next to the same images prepared as 64x64 PNG shards; and the time
`resolve_input` takes to list many shards. See shard_io's docstring for what is measured.

The listing alone, at a driver's scale (the "Scaling out" section of the README):

    python -m pipeline.bench.foreign_io --local-shards 100000 --s3-shards 10000
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.common import BENCH_BUCKET, fake_s3_credentials, machine, start_s3
from pipeline.data.input_reader import iter_input, read_input
from pipeline.data.inputs import resolve_input
from pipeline.data.shards import prepare
from pipeline.data.sources import open_source
from pipeline.storage import StorageConfig, fsspec_filesystem, join_url

__all__ = ["ForeignRuns", "foreign_figures", "foreign_markdown", "listing_figures"]

SHAPE = (3, 64, 64)
PER_SHARD = 250  # JPEG photos per foreign shard
# (height, width) of the photos, cycled: what web-scale image shards typically hold.
PHOTO_SIZES = ((256, 256), (240, 320), (320, 240), (384, 512))


@dataclass(frozen=True)
class ForeignRuns:
    images: int
    repeats: int
    with_ray: bool
    remote_args: dict[str, Any] | None  # for Ray read tasks on S3 (stand-in credentials)


def _photos(count: int) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of `count` photo patches (random pixels without scikit-image)."""
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


def _put(paths: list[Path], prefix: str, storage: StorageConfig | None) -> str:
    """The shards under `prefix` (copied when it is on S3); the prefix."""
    if storage is not None:
        for path in paths:
            fs, key = fsspec_filesystem(join_url(prefix, path.name), storage)
            fs.put_file(str(path), key)
    return prefix


def _rate(action: Any) -> float:
    started = time.perf_counter()
    count = action()
    return count / (time.perf_counter() - started)


def _reads(spec: str, storage: StorageConfig | None, runs: ForeignRuns) -> dict[str, float]:
    """images/s of `spec` read with iter_input and (with Ray) read_input, medians."""
    args = runs.remote_args if storage is not None else None

    def plain() -> int:
        return sum(1 for _ in iter_input(spec, storage, shape=SHAPE))

    def ray() -> int:
        dataset = read_input(spec, storage, shape=SHAPE, ray_remote_args=args)
        return sum(len(b["key"]) for b in dataset.iter_batches(batch_size=256))

    figures = {"iter": statistics.median(_rate(plain) for _ in range(runs.repeats))}
    if runs.with_ray:
        figures["ray"] = statistics.median(_rate(ray) for _ in range(runs.repeats))
    return figures


def foreign_figures(
    base: Path, backends: dict[str, tuple[str, StorageConfig | None]], runs: ForeignRuns
) -> dict[str, Any]:
    """Foreign JPEG shards versus prepared PNG shards, images/s per backend (medians)."""
    paths = _write_foreign(base / "foreign-jpeg", _photos(runs.images))
    results = {}
    for backend, (root, storage) in backends.items():
        where = root if storage is not None else str(base / "foreign-local")
        foreign = _put(paths, join_url(where, "foreign"), storage)
        if storage is None:
            foreign = str(base / "foreign-jpeg")
        out = join_url(where, "foreign-prepared")
        started = time.perf_counter()
        source = open_source(f"webdataset:{foreign}", storage, channels=3, size=SHAPE[1:])
        written = prepare(source, out, storage, shard_samples=PER_SHARD, shard_bytes=None)
        reshard = written.splits["train"].manifest.count / (time.perf_counter() - started)
        prepared = join_url(out, "train")
        in_place, png = _reads(foreign, storage, runs), _reads(prepared, storage, runs)
        results[backend] = {
            "reshard": reshard,
            **{f"foreign_{k}": v for k, v in in_place.items()},
            **{f"prepared_{k}": v for k, v in png.items()},
            "jpeg_mb": sum(p.stat().st_size for p in paths) / 1e6,
            "png_mb": sum(s.bytes for s in written.splits["train"].manifest.shards) / 1e6,
        }
    return {"images": runs.images, "per_shard": PER_SHARD, "results": results}


def _tiny_shards_local(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    empty = b"\0" * 1024  # an empty tar: its two end-of-archive blocks
    for i in range(count):
        (folder / f"{i:06d}.tar").write_bytes(empty)


def _tiny_shards_s3(prefix: str, count: int, storage: StorageConfig) -> None:
    """`count` objects in moto's bucket, put through its backend (10,000 PUTs over HTTP would
    cost minutes here and measure nothing of ours); the listing still goes over HTTP."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    key = prefix.split("://", 1)[1].split("/", 1)[1]
    for i in range(count):
        backend.put_object(BENCH_BUCKET, f"{key}/{i:06d}.tar", b"\0" * 1024)


def listing_figures(
    base: Path, backends: dict[str, tuple[str, StorageConfig | None]], count: int
) -> dict[str, Any]:
    """Seconds `resolve_input` takes over `count` tiny shards, as a prefix and as a pattern."""
    results = {}
    for backend, (root, storage) in backends.items():
        if storage is None:
            prefix = str(base / "tiny")
            _tiny_shards_local(Path(prefix), count)
        else:
            prefix = join_url(root, "tiny")
            _tiny_shards_s3(prefix, count, storage)
        pattern = join_url(prefix, f"{{000000..{count - 1:06d}}}.tar")
        figures = {}
        for name, spec in (("prefix_s", prefix), ("pattern_s", pattern)):
            plan = resolve_input(spec, storage)
            assert len(plan.shards) == count, (spec, len(plan.shards))
            figures[name] = plan.listing_seconds
        results[backend] = figures
    return {"shards": count, "results": results}


def foreign_markdown(report: dict[str, Any]) -> str:
    lines = []
    names = {"local": "local disk", "s3": "S3 (moto, loopback)"}
    if "foreign" in report:
        foreign = report["foreign"]
        ray = "foreign_ray" in next(iter(foreign["results"].values()))
        header = "| storage | JPEG in place (iter) | 64x64 PNG prepared (iter) |"
        header += " JPEG in place (Ray Data) | PNG prepared (Ray Data) |" if ray else ""
        header += " re-shard (prepare) | JPEG MB | PNG MB |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for backend, f in foreign["results"].items():
            cells = [f["foreign_iter"], f["prepared_iter"]]
            cells += [f["foreign_ray"], f["prepared_ray"]] if ray else []
            cells.append(f["reshard"])
            row = " | ".join(f"{c:,.0f}" for c in cells)
            lines.append(f"| {names[backend]} | {row} | {f['jpeg_mb']:.1f} | {f['png_mb']:.1f} |")
        lines += [
            "",
            f"images/s: {foreign['images']} JPEG photos (256x256 to 384x512, quality 90) in "
            f"shards of {foreign['per_shard']}, decoded and fitted to 3x64x64 in place, versus "
            "the same images prepared as 3x64x64 PNG shards; re-shard is prepare's rate.",
        ]
    if "listing" in report:
        listing = report["listing"]
        lines += ["", "| storage | list a prefix (s) | list a brace pattern (s) |", "|---|---|---|"]
        for backend, f in listing["results"].items():
            lines.append(f"| {names[backend]} | {f['prefix_s']:.2f} | {f['pattern_s']:.2f} |")
        lines += ["", f"resolve_input over {listing['shards']:,} tiny shards: one listing each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The listing figures alone: local disk and S3 (moto) shard counts set separately."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.foreign_io",
        description="Seconds resolve_input takes to list many tiny shards (local disk, S3/moto).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--local-shards", type=int, default=100_000, help="0 skips local disk")
    parser.add_argument("--s3-shards", type=int, default=10_000, help="0 skips S3 (moto)")
    args = parser.parse_args(argv)
    load = machine()["load_average"]
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        lines = []
        if args.local_shards:
            local = listing_figures(base, {"local": (str(base), None)}, args.local_shards)
            lines.append(foreign_markdown({"listing": local}))
        if args.s3_shards:
            fake_s3_credentials(stack)
            storage = start_s3(stack)
            root = f"s3://{BENCH_BUCKET}/listing"
            s3 = listing_figures(base, {"s3": (root, storage)}, args.s3_shards)
            lines.append(foreign_markdown({"listing": s3}))
    print("\n".join(lines) + f"\n\nload average at start {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
