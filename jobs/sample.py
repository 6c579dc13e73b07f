"""`flowray sample`: generate images from a registered model with Ray tasks.

    flowray sample --model models:/fashion-flow@champion -n 1000 --output samples/run1

Writes PNG WebDataset shards + manifest (scorable with `flowray score --input`), a grid PNG at
several temperatures, and an MLflow run. The same --seed gives the same images.
"""

from __future__ import annotations

import argparse
import sys

from jobs._batch import check_local_gpus, check_tracking_server, connect_ray
from jobs.config import config_from_args, config_parser, setup_logging
from jobs.errors import run_main

PROG = "flowray sample"


def parser() -> argparse.ArgumentParser:
    from pipeline.batch.sampling import SampleConfig

    description = "Generate images with Ray tasks into PNG WebDataset shards + manifest + grid."
    return config_parser(PROG, description, SampleConfig, flags={"n": ("-n", "--num")})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from pipeline.batch.sampling import SampleConfig, generate

        config = config_from_args(SampleConfig, args)
        check_tracking_server(config.tracking_uri)
        check_local_gpus("--gpus-per-task", config.gpus_per_task, args.address)
        connect_ray(args.address, args.verbose)
        result = generate(config)
        print(result.line())
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
