"""`flowray sample`: generate images from a registered model with Ray tasks.

    flowray sample --model models:/fashion-flow@champion --n 1000 --output samples/run1

Writes PNG WebDataset shards + manifest (scorable with `flowray score --input`), a grid PNG at
several temperatures, and an MLflow run. The same --seed gives the same images.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs._batch import (
    add_common_arguments,
    check_local_gpus,
    check_tracking_server,
    connect_ray,
    default_of,
)
from jobs.config import HelpFormatter, add_config_arguments, load_config
from jobs.errors import run_main

PROG = "flowray sample"


def parser() -> argparse.ArgumentParser:
    from pipeline.batch.sampling import SampleConfig

    def d(name: str) -> object:
        return default_of(SampleConfig, name)

    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description="Generate images with Ray tasks into PNG WebDataset shards + manifest + grid.",
    )
    p.add_argument(
        "--model",
        help="models:/<name>@<alias>, models:/<name>/<version>, runs:/... or a local model "
        "directory (required unless in --config)",
    )
    p.add_argument("--output", help="output prefix, local or s3:// (required unless in --config)")
    p.add_argument("--n", type=int, help=f"number of images (default: {d('n')})")
    p.add_argument(
        "--temperature",
        type=float,
        help=f"latent temperature of the shards' images (default: {d('temperature')})",
    )
    p.add_argument("--seed", type=int, help=f"seed; same seed, same images (default: {d('seed')})")
    p.add_argument(
        "--tasks",
        type=int,
        help=f"chunks in flight at once; 0 = two per CPU (default: {d('tasks')})",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        help=f"images per task and per seed; raise it on GPUs (default: {d('chunk_size')})",
    )
    p.add_argument(
        "--gpus-per-task",
        type=float,
        help=f"GPUs per task; > 0 samples on CUDA (default: {d('gpus_per_task')})",
    )
    p.add_argument(
        "--experiment", help=f"MLflow experiment of the run (default: {d('experiment')})"
    )
    add_config_arguments(p, None)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    def body() -> int:
        from pipeline.batch.sampling import SampleConfig, generate
        from pipeline.tracking.connection import resolve_tracking_uri

        config = load_config(
            SampleConfig,
            args.config,
            args.overrides,
            {
                "model": args.model,
                "output": args.output,
                "n": args.n,
                "temperature": args.temperature,
                "seed": args.seed,
                "tasks": args.tasks,
                "chunk_size": args.chunk_size,
                "gpus_per_task": args.gpus_per_task,
                "experiment": args.experiment,
                "tracking_uri": args.tracking_uri,
                "storage.endpoint_url": args.endpoint_url,
            },
        )
        check_tracking_server(resolve_tracking_uri(config.tracking_uri))
        check_local_gpus("--gpus-per-task", config.gpus_per_task, args.address)
        connect_ray(args.address, args.verbose)
        result = generate(config)
        print(result.line())
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
