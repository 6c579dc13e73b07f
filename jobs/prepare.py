"""`flowray prepare`: write WebDataset image shards + manifest.json per split from IDX files, image
folders or .npy arrays, on local disk or S3. Reruns complete what is missing and skip the rest.

    flowray prepare --out data                                       # Fashion-MNIST, train + test
    flowray prepare --source folder:s3://photos/raw --size 64x64 --val-fraction 0.1 \\
        --out s3://datasets/photos --endpoint-url http://127.0.0.1:9000 --workers 4

The work is `pipeline.data.shards.prepare`; this module parses options, connects to Ray when
--workers > 0, prints progress and a summary, and turns the errors users meet into one line and a
hint (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from jobs.config import HelpFormatter
from jobs.errors import JobExit, user_errors
from pipeline.data.images import ImageLimits
from pipeline.data.shards import PrepareResult, ShardEvent, prepare
from pipeline.data.sources import default_idx_dir, open_source
from pipeline.storage import StorageConfig, check_access, is_s3, join_url

__all__ = ["build_parser", "main"]

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


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip().lower())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW such as 64x64, found {text!r}")
    return int(match[1]), int(match[2])


def _bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip().lower())
    if not match or match[2] not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MiB or 100MB, found {text!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowray prepare",
        description="Write WebDataset image shards and a manifest per split "
        "(<out>/<split>/shard-NNNNNN.tar, manifest.json).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--source",
        default=f"idx:{default_idx_dir()}",
        help="idx:<folder with the 4 IDX files> | folder:<url of JPEG/PNG tree, class sub-folders "
        "become labels> | npy:<images.npy>[,<labels.npy>] | webdataset:<shard pattern "
        "{000000..000099}.tar, prefix or list file of WebDataset shards>; local or s3://",
    )
    parser.add_argument(
        "--out", required=True, help="output URL (required): a local path or s3://bucket/prefix"
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to write (default: all: IDX has train,test; folder/npy "
        "have train, plus val with --val-fraction)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="folder/npy sources: put this random fraction of the images in a 'val' split",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    parser.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="target channels (default: the source's own; folders: 3)",
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=None,
        help="target HxW, centre-crop + resize (default: the source's own; folders need it)",
    )
    parser.add_argument(
        "--shard-samples", type=_positive, default=10_000, help="most images per shard"
    )
    parser.add_argument(
        "--shard-bytes",
        type=_bytes,
        default="256MiB",
        help="target bytes per shard, e.g. 64MB or 256MiB; 0 for no byte target",
    )
    parser.add_argument(
        "--limit",
        type=_positive,
        default=None,
        help="at most N images per split (demos, tests) (default: all)",
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="an undecodable source image stops prepare, or is logged, counted and left out",
    )
    limits = ImageLimits()
    parser.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=limits.max_pixels,
        help="an image file whose header declares more pixels (width x height) is a bad input, "
        "refused before decoding (a decompression bomb); --on-error decides what happens to it",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=_bytes,
        default=f"{limits.max_bytes >> 20}MiB",
        help="an image file larger than this is a bad input, refused before it is read whole",
    )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000; credentials come from the usual "
        "AWS environment/config (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    parser.add_argument(
        "--region",
        default=None,
        help="S3 region (default: $AWS_REGION, else $AWS_DEFAULT_REGION)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray tasks writing shards at once; 0 writes in this process without Ray",
    )
    parser.add_argument(
        "--address",
        dest="ray_address",
        metavar="ADDRESS",
        default=None,
        help="Ray cluster for --workers > 0 (default: $RAY_ADDRESS, else a local Ray instance)",
    )
    # The option's old name, still accepted; hidden so that every command shows --address.
    parser.add_argument("--ray-address", dest="ray_address", help=argparse.SUPPRESS)
    return parser


class ShardProgress:
    """Prints one line per shard and keeps the images/s figure honest (written images only)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, event: ShardEvent) -> None:
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


def _run(args: argparse.Namespace) -> None:
    storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    # Fail in seconds on a wrong endpoint, missing credentials or bucket, before any work.
    for url in {args.out, args.source.partition(":")[2].split(",")[0]}:
        if is_s3(url):
            check_access(url, storage)
    source = open_source(
        args.source,
        storage,
        channels=args.channels,
        size=args.size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        limits=ImageLimits(max_pixels=args.max_image_pixels, max_bytes=args.max_image_bytes),
    )
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    counts = source.splits()
    print(f"source: {source.description}")
    print(
        f"  splits: {', '.join(f'{k}={v}' for k, v in counts.items())}; image shape "
        f"{list(source.shape)} uint8; labels: {'yes' if source.has_labels else 'no'}"
        + (f" ({len(source.classes)} classes)" if source.classes else "")
    )
    print(
        f"out: {args.out}"
        + (f" ({storage.describe()})" if is_s3(args.out) else "")
        + f"; shards of at most {args.shard_samples} images"
        + (f" / {args.shard_bytes / 2**20:.0f} MiB" if args.shard_bytes else "")
        + (f"; limit {args.limit} per split" if args.limit else "")
        + (f"; {args.workers} Ray workers" if args.workers else "; in this process")
    )
    if args.workers > 0:
        import ray

        ray.init(address=args.ray_address, logging_level=logging.WARNING, ignore_reinit_error=True)
    result = prepare(
        source,
        args.out,
        storage,
        splits=splits,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes or None,
        limit=args.limit,
        workers=args.workers,
        on_error=args.on_error,
        progress=ShardProgress(),
    )
    print("done:")
    for line in summary_lines(result):
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with user_errors("flowray prepare"):
            _run(args)
    except JobExit as exit_:
        return int(exit_.code or 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
