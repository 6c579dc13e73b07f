"""`flowray prepare`: write WebDataset image shards + manifest.json per split from IDX files, image
folders or .npy arrays, on local disk or S3. Reruns complete what is missing and skip the rest.

    flowray prepare --output flowray-work/data                      # Fashion-MNIST, train + test
    flowray prepare --source folder:s3://photos/raw --size 64x64 --val-fraction 0.1 \\
        --output s3://datasets/photos --endpoint-url http://127.0.0.1:9000 --tasks 4

The options are `PrepareConfig`'s fields; the work is `pipeline.data.shards.prepare`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Literal

from flowmodel.typed import check_at_least, check_required
from jobs.config import config_from_args, config_parser, setup_logging
from jobs.errors import run_main
from pipeline.data.images import ImageLimits
from pipeline.data.shards import PrepareResult, ShardEvent, prepare
from pipeline.data.sources import default_idx_dir, open_source
from pipeline.storage import StorageConfig, check_access, is_s3, join_url

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> tuple[int, int]:
    """ "64x64" or "64,64" -> (64, 64)."""
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip().lower())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"expected HxW such as 64x64, found {text!r}")
    return int(match[1]), int(match[2])


def parse_bytes(value: int | str) -> int:
    """A byte count, or a size such as "256MiB" or "100MB"."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip().lower())
    if not match or match[2] not in _UNITS:
        raise ValueError(f"expected a size such as 256MiB or 100MB, found {value!r}")
    return int(float(match[1]) * _UNITS[match[2]])


@dataclass(frozen=True)
class PrepareConfig:
    """One prepare job. `output` is required.

    Attributes:
        source: idx:<folder with the 4 IDX files> | folder:<url of a JPEG/PNG tree, class
            sub-folders become labels> | npy:<images.npy>[,<labels.npy>] | webdataset:<shard
            pattern {000000..000099}.tar, prefix or list file of WebDataset shards>; local or
            s3://.
        output: where the splits go, <output>/<split>/: a local path or s3://bucket/prefix.
        splits: comma-separated splits to write (None: all the source has: IDX has train,test;
            folder/npy have train, plus val with val_fraction).
        val_fraction: folder/npy sources: put this random fraction of the images in a 'val'
            split.
        seed: seed of the train/val assignment.
        channels: target channels (None: the source's own; folders: 3).
        size: target HxW such as 64x64, centre-crop + resize (None: the source's own; folders
            need it).
        shard_samples: most images per shard.
        shard_bytes: target bytes per shard, e.g. 64MB or 256MiB; 0 for no byte target.
        limit: at most N images per split, for demos and tests (None: all).
        on_error: an undecodable source image stops prepare ("fail"), or is logged, counted and
            left out ("skip").
        max_image_pixels: an image whose header declares more pixels (width x height) is a bad
            input, refused before decoding (a decompression bomb); on_error decides what happens
            to it.
        max_image_bytes: an image file larger than this is a bad input, refused before it is
            read whole.
        tasks: Ray tasks writing shards at once; 0 writes in this process without Ray.
        storage: S3 endpoint and region for the source and the output.
    """

    output: str
    source: str = field(default_factory=lambda: f"idx:{default_idx_dir()}")
    splits: str | None = None
    val_fraction: float = 0.0
    seed: int = 0
    channels: Literal[1, 3] | None = None
    size: str | None = None
    shard_samples: int = 10_000
    shard_bytes: int | str = "256MiB"
    limit: int | None = None
    on_error: Literal["fail", "skip"] = "fail"
    max_image_pixels: int = ImageLimits.max_pixels
    max_image_bytes: int | str = f"{ImageLimits.max_bytes >> 20}MiB"
    tasks: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        check_required(self, "output")
        if self.size is not None:
            parse_size(self.size)
        if parse_bytes(self.shard_bytes) < 0 or parse_bytes(self.max_image_bytes) < 1:
            raise ValueError(
                f"shard_bytes >= 0 and max_image_bytes >= 1 expected, found {self.shard_bytes} "
                f"and {self.max_image_bytes}"
            )
        check_at_least(self, 1, "shard_samples", "max_image_pixels")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: expected >= 1 or none, found {self.limit}")
        check_at_least(self, 0, "tasks")


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        "flowray prepare",
        "Write WebDataset image shards and a manifest per split "
        "(<output>/<split>/shard-NNNNNN.tar, manifest.json).",
        PrepareConfig,
        address="for --tasks > 0",
    )


def print_progress(event: ShardEvent) -> None:
    """One line per shard as it finishes."""
    state = "written" if event.written else "skipped (complete)"
    rate = event.images_done / max(event.elapsed, 1e-9)
    print(
        f"  {event.split} {event.name} {state}: {event.count} images, "
        f"{event.bytes / 1e6:.1f} MB [{event.done}/{event.total}] {rate:,.0f} images/s",
        flush=True,
    )


def summary_lines(result: PrepareResult) -> list[str]:
    lines = []
    for split, r in result.splits.items():
        rate = r.images_written / r.seconds if r.images_written else 0.0
        manifest = "written" if r.manifest_written else "unchanged"
        lines.append(
            f"{split}: {r.manifest.count} images {list(r.manifest.shape)} in "
            f"{len(r.manifest.shards)} shards ({r.shards_written} written, {r.shards_skipped} "
            f"already complete), manifest {manifest}, {r.seconds:.1f} s"
            + (f", {rate:,.0f} images/s written" if r.images_written else "")
            + (
                f", {r.manifest.skipped_inputs} bad inputs skipped"
                if r.manifest.skipped_inputs
                else ""
            )
            + f" -> {join_url(result.out, split)}"
        )
    return lines


def _run(config: PrepareConfig, address: str | None) -> int:
    storage = config.storage
    # Fail in seconds on a wrong endpoint, missing credentials or bucket, before any work.
    for url in {config.output, config.source.partition(":")[2].split(",")[0]}:
        if is_s3(url):
            check_access(url, storage)
    source = open_source(
        config.source,
        storage,
        channels=config.channels,
        size=parse_size(config.size) if config.size else None,
        val_fraction=config.val_fraction,
        seed=config.seed,
        limits=ImageLimits(config.max_image_pixels, parse_bytes(config.max_image_bytes)),
    )
    shard_bytes = parse_bytes(config.shard_bytes)
    counts = source.splits()
    print(f"source: {source.description}")
    print(
        f"  splits: {', '.join(f'{k}={v}' for k, v in counts.items())}; image shape "
        f"{list(source.shape)} uint8; labels: {'yes' if source.has_labels else 'no'}"
        + (f" ({len(source.classes)} classes)" if source.classes else "")
    )
    print(
        f"output: {config.output}"
        + (f" ({storage.describe()})" if is_s3(config.output) else "")
        + f"; shards of at most {config.shard_samples} images"
        + (f" / {shard_bytes / 2**20:.0f} MiB" if shard_bytes else "")
        + (f"; limit {config.limit} per split" if config.limit else "")
        + (f"; {config.tasks} Ray tasks" if config.tasks else "; in this process")
    )
    if config.tasks > 0:
        import ray

        ray.init(address=address, logging_level=logging.WARNING, ignore_reinit_error=True)
    result = prepare(
        source,
        config.output,
        storage,
        splits=[s.strip() for s in (config.splits or "").split(",") if s.strip()] or None,
        shard_samples=config.shard_samples,
        shard_bytes=shard_bytes or None,
        limit=config.limit,
        workers=config.tasks,
        on_error=config.on_error,
        progress=print_progress,
    )
    print("done:")
    for line in summary_lines(result):
        print(f"  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    return run_main(
        "flowray prepare", lambda: _run(config_from_args(PrepareConfig, args), args.address)
    )


if __name__ == "__main__":
    sys.exit(main())
