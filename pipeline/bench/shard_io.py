"""Shard I/O benchmark: write and read throughput (images/s), local disk versus an S3 endpoint.

    python -m pipeline.bench.shard_io                      # 4000 Fashion-MNIST images, 3 repeats
    python -m pipeline.bench.shard_io --images 10000 --repeats 5 --no-ray

For each backend, each repeat writes the images as shards to a fresh prefix with
`pipeline.data.shards.prepare` (in this process), then reads them back with `iter_split` (in this
process) and, unless --no-ray, with `read_split` through Ray Data. It reports medians as a Markdown
table; `run(...)` returns the same figures as a dict (for `flowray bench`).

The S3 endpoint is moto's ThreadedMotoServer on 127.0.0.1, in this process, with stand-in
credentials set in the environment for the duration of `run` (moto accepts any). It shares the GIL
with the client, so its figures are a lower bound for the client-side cost of the S3 code path,
not a measure of a real object store.
The source is Fashion-MNIST (FASHION_MNIST_DIR) when present, else random 28x28 greyscale images.

Foreign shards (issue 13), after that: `foreign_images` (500) JPEG photos (patches of scikit-image's
photos at 256x256 to 512x384, quality 90, as img2dataset-style tools store them) written by
webdataset's ShardWriter with .json and .txt beside each image, read in place with decode + fit
to 3x64x64 (`iter_input`, and `read_input` through Ray Data), next to the same images re-sharded
by `prepare --source webdataset:` into 64x64 PNG shards and read the same way; local and S3.
Then the listing: `resolve_input` over `listing_shards` tiny shards (a prefix and a brace
pattern), local and S3. moto answers a 1000-key page of a listing in about a second on a loaded
2-core machine (AWS S3 in tens of milliseconds), so the S3 listing figure is mostly moto's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.common import (
    BENCH_BUCKET,
    FAKE_S3_CREDENTIALS,
    fake_s3_credentials,
    start_s3,
)
from pipeline.bench.foreign_io import (
    ForeignRuns,
    foreign_figures,
    foreign_markdown,
    listing_figures,
)
from pipeline.data.reader import iter_split, read_split
from pipeline.data.shards import prepare
from pipeline.data.sources import ImageSource, NpySource, SourceError, open_source
from pipeline.storage import StorageConfig, join_url

__all__ = ["main", "markdown", "run"]


def _source(n_images: int, workdir: Path) -> ImageSource:
    try:
        return open_source("idx:")
    except SourceError:
        images = np.random.default_rng(0).integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
        np.save(workdir / "bench-images.npy", images)
        return NpySource(str(workdir / "bench-images.npy"))


def _timed(action: Callable[[], int]) -> float:
    """Images per second of `action`, which returns how many images it handled."""
    started = time.perf_counter()
    count = action()
    return count / (time.perf_counter() - started)


def run(
    n_images: int = 4000,
    repeats: int = 3,
    shard_samples: int = 500,
    with_ray: bool = True,
    workdir: str | None = None,
    foreign_images: int | None = None,
    listing_shards: int | None = None,
) -> dict[str, Any]:
    """Measure write/read images/s on local disk and on S3 (moto); medians over `repeats`.

    Args:
        foreign_images: JPEG photos in the foreign-shard runs (None: 500, or n_images / 2
            when n_images < 1000, as in the smoke run; 0 skips them). Their reads are
            repeated min(repeats, 2) times: decoding dominates them, and the default run
            stays near two minutes.
        listing_shards: tiny shards listed (None: 10,000, or 200 when n_images < 1000; 0
            skips the listing).

    Returns:
        {"images": n, "repeats": r, "source": description, "shard_samples": s,
         "results": {"local": {"write": x, "read_iter": y, "read_ray": z, "mb": m}, "s3": {...}},
         "foreign": {"images": f, "results": {"local": {"reshard": .., "foreign_iter": ..,
         "prepared_iter": .., "foreign_ray": .., "prepared_ray": .., "jpeg_mb": .., "png_mb": ..},
         "s3": {...}}}, "listing": {"shards": k, "results": {"local": {"prefix_s": ..,
         "pattern_s": ..}, "s3": {...}}}, "markdown": tables}. The Ray columns are absent with
        with_ray=False.
    """
    if foreign_images is None:
        foreign_images = 500 if n_images >= 1000 else max(1, n_images // 2)
    if listing_shards is None:
        listing_shards = 10_000 if n_images >= 1000 else 200
    with ExitStack() as stack:
        base = (
            Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        source = _source(n_images, base)
        split = next(iter(source.splits()))
        n_images = min(n_images, source.splits()[split])
        fake_s3_credentials(stack)
        backends = {
            "local": (str(base / "bench-local"), None),
            # A prefix of its own: moto keeps one store per process, whatever the server.
            "s3": (f"s3://{BENCH_BUCKET}/io-{uuid.uuid4().hex[:8]}", start_s3(stack)),
        }
        remote_args = _ray_with_credentials(stack) if with_ray else None
        # Warm-up: decompress the source and import codecs outside the timed runs.
        list(source.read(split, range(min(n_images, 64))))

        results = _prepared_figures(
            source, split, backends, n_images, repeats, shard_samples, with_ray, remote_args
        )
        extra: dict[str, Any] = {}
        if foreign_images:
            runs = ForeignRuns(foreign_images, min(repeats, 2), with_ray, remote_args)
            extra["foreign"] = foreign_figures(base, backends, runs)
        if listing_shards:
            extra["listing"] = listing_figures(base, backends, listing_shards)
    report = {
        "images": n_images,
        "repeats": repeats,
        "shard_samples": shard_samples,
        "source": source.description,
        "results": results,
        **extra,
    }
    report["markdown"] = markdown(report)
    return report


def _prepared_figures(
    source: ImageSource,
    split: str,
    backends: dict[str, tuple[str, StorageConfig | None]],
    n_images: int,
    repeats: int,
    shard_samples: int,
    with_ray: bool,
    remote_args: dict[str, Any] | None,
) -> dict[str, dict[str, float]]:
    """{backend: {"write", "read_iter", ["read_ray"], "mb"}}: medians over `repeats`."""
    samples: dict[str, dict[str, list[float]]] = {b: {} for b in backends}
    megabytes: dict[str, float] = {}
    for repeat in range(repeats):
        for backend, (root, storage) in backends.items():
            timings, megabytes[backend] = _write_and_read(
                source,
                split,
                join_url(root, f"run-{repeat}"),
                storage,
                limit=n_images,
                shard_samples=shard_samples,
                with_ray=with_ray,
                remote_args=remote_args,
            )
            for name, value in timings.items():
                samples[backend].setdefault(name, []).append(value)
    return {
        backend: {name: statistics.median(values) for name, values in timings.items()}
        | {"mb": megabytes[backend]}
        for backend, timings in samples.items()
    }


def _ray_with_credentials(stack: ExitStack) -> dict[str, Any] | None:
    """A local Ray whose workers see the stand-in credentials: started now, they inherit them
    (None is returned); a Ray already running gets them as remote args for the read tasks."""
    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return {"runtime_env": {"env_vars": dict(FAKE_S3_CREDENTIALS)}}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    stack.callback(ray.shutdown)
    return None


def _write_and_read(
    source: ImageSource,
    split: str,
    out: str,
    storage: StorageConfig | None,
    *,
    limit: int,
    shard_samples: int,
    with_ray: bool,
    remote_args: dict[str, Any] | None,
) -> tuple[dict[str, float], float]:
    """Images/s writing `limit` images as shards to `out`, reading them with `iter_split` and
    (with_ray) with Ray Data; and the shards' megabytes."""
    split_url = join_url(out, split)
    written = {}

    def write() -> int:
        result = prepare(
            source, out, storage, splits=[split], limit=limit, shard_samples=shard_samples
        )
        written["manifest"] = result.splits[split].manifest
        return result.splits[split].images_written

    def read_iter() -> int:
        return sum(1 for _ in iter_split(split_url, storage))

    def read_ray() -> int:
        dataset = read_split(split_url, storage, ray_remote_args=remote_args if storage else None)
        return sum(len(b["key"]) for b in dataset.iter_batches(batch_size=256))

    timings = {"write": _timed(write), "read_iter": _timed(read_iter)}
    if with_ray:
        timings["read_ray"] = _timed(read_ray)
    return timings, sum(s.bytes for s in written["manifest"].shards) / 1e6


def markdown(report: dict[str, Any]) -> str:
    columns = [
        ("write", "write"),
        ("read_iter", "read (iter_split)"),
        ("read_ray", "read (Ray Data)"),
    ]
    present = [(k, title) for k, title in columns if k in report["results"]["local"]]
    header = "| storage | " + " | ".join(f"{t} images/s" for _, t in present) + " | shards MB |"
    lines = [header, "|" + "---|" * (len(present) + 2)]
    for backend, figures in report["results"].items():
        cells = " | ".join(f"{figures[k]:,.0f}" for k, _ in present)
        name = "local disk" if backend == "local" else "S3 (moto, loopback)"
        lines.append(f"| {name} | {cells} | {figures['mb']:.1f} |")
    lines.append("")
    lines.append(
        f"{report['images']} images from {report['source']}, {report['shard_samples']} per shard, "
        f"median of {report['repeats']} runs."
    )
    if "foreign" in report or "listing" in report:
        lines += ["", foreign_markdown(report)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.shard_io",
        description="Shard write/read throughput: local disk versus S3 (moto on loopback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=4000, help="images written and read per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend; medians reported")
    parser.add_argument("--shard-samples", type=int, default=500, help="images per shard")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data read")
    parser.add_argument(
        "--foreign-images", type=int, default=None, help="JPEG photos (default: 500)"
    )
    parser.add_argument(
        "--listing-shards", type=int, default=None, help="tiny shards listed (default: 10000)"
    )
    parser.add_argument("--workdir", default=None, help="local folder for shards; None: a temp dir")
    args = parser.parse_args(argv)
    report = run(
        args.images,
        args.repeats,
        args.shard_samples,
        not args.no_ray,
        args.workdir,
        args.foreign_images,
        args.listing_shards,
    )
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
