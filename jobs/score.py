"""`flowray score`: bulk log-likelihood scoring of a prepared split with a registered model.

    flowray score --model models:/fashion-flow@champion --input data/fmnist/test --output scores

Runs locally (Ray started in-process) or on a cluster (`--address`, or under `ray job submit`).
A rerun scores only shards without output; see pipeline/batch/scoring.py for the layout.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs._batch import add_common_arguments, check_tracking_server, connect_ray, default_of
from jobs.config import HelpFormatter, add_config_arguments, load_config
from jobs.errors import run_main

PROG = "flowray score"


def parser() -> argparse.ArgumentParser:
    from pipeline.batch.score_config import ScoreConfig

    def d(name: str) -> object:
        return default_of(ScoreConfig, name)

    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description="Score every image of a prepared split: log-likelihood (nats), bits/dim and "
        "a complexity-corrected OOD score, as Parquet per shard under "
        "<output>/model=<name>/version=<v>/. Shards already scored are skipped.",
    )
    p.add_argument(
        "--model",
        help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run>/<path> or a local "
        "model directory (required unless in --config)",
    )
    p.add_argument(
        "--input",
        help="prepared split, <data>/<split>, local or s3:// (required unless in --config)",
    )
    p.add_argument("--output", help="output prefix, local or s3:// (required unless in --config)")
    p.add_argument(
        "--batch-size", type=int, help=f"images per forward pass (default: {d('batch_size')})"
    )
    p.add_argument(
        "--actors",
        type=int,
        help=f"scoring actors; 0 = one per CPU less one for reading (default: {d('actors')})",
    )
    p.add_argument(
        "--gpus-per-actor", type=float, help=f"GPUs per actor (default: {d('gpus_per_actor')})"
    )
    p.add_argument(
        "--draws",
        type=int,
        help=f"dequantization draws per image, averaged in probability space (default: {d('draws')})",
    )
    p.add_argument(
        "--seed",
        type=int,
        help=f"dequantization seed, as training's eval_seed (default: {d('seed')})",
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        help=f"unreadable images: skip (logged, counted) or fail (default: {d('on_error')})",
    )
    p.add_argument(
        "--experiment", help=f"MLflow experiment of the summary run (default: {d('experiment')})"
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
        from pipeline.batch.score_config import ScoreConfig
        from pipeline.batch.scoring import score
        from pipeline.tracking.connection import resolve_tracking_uri

        config = load_config(
            ScoreConfig,
            args.config,
            args.overrides,
            {
                "model": args.model,
                "input": args.input,
                "output": args.output,
                "batch_size": args.batch_size,
                "actors": args.actors,
                "gpus_per_actor": args.gpus_per_actor,
                "draws": args.draws,
                "seed": args.seed,
                "on_error": args.on_error,
                "experiment": args.experiment,
                "tracking_uri": args.tracking_uri,
                "storage.endpoint_url": args.endpoint_url,
            },
        )
        check_tracking_server(resolve_tracking_uri(config.tracking_uri))
        connect_ray(args.address)
        result = score(config)
        print(result.line())
        if result.summary_url:
            print(f"summary: {result.summary_url}  mlflow run: {result.mlflow_run_id}")
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
