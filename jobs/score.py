"""`flowray score`: bulk log-likelihood scoring of any input with a registered model.

    flowray score --model models:/fashion-flow@champion --input data/fmnist/test --output scores
    flowray score --model models:/fashion-flow@champion --input s3://bucket/incoming/ --output ...

The input is a prepared split or the user's own WebDataset shards read in place: a brace pattern
(`s3://b/photos/{000000..004999}.tar`), a prefix of *.tar, or a text file listing shard URLs.
Runs locally (Ray started in-process) or on a cluster (`--address`, or under `ray job submit`).
A rerun scores only shards without output (for foreign shards: at their current version), see
pipeline/batch/scoring/job.py.

Exit codes: 0 every shard scored; 3 shards that could not be read whole were left out (each
printed; a rerun retries them); 1 no shard could be scored; 2 a usage error; 5 every shard
scored, but the drift verdict against the version's calibration (`drift: none | suspected |
detected (...)`, pipeline.model.calibration) reaches --fail-on-drift (off by default).

The model is --model (or --set model=...), else $FLOWRAY_SCORE_MODEL, else the --config file's:
scheduled jobs (infra/k8s/raycronjob-score.yaml) take it from their ConfigMap, pinned to a
version or to an alias the release process owns.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from jobs._batch import check_local_gpus, check_tracking_server, connect_ray
from jobs.config import config_flags, config_from_args, config_parser, setup_logging
from jobs.errors import EXIT_DRIFT, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, run_main

if TYPE_CHECKING:
    from pipeline.batch.scoring.config import ScoreResult

PROG = "flowray score"
MODEL_VARIABLE = "FLOWRAY_SCORE_MODEL"
EXIT_CODES = {"complete": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILURE}


def parser() -> argparse.ArgumentParser:
    from pipeline.batch.scoring.config import ScoreConfig

    description = (
        "Score every image of an input (a prepared split, or WebDataset shards read in place): "
        "log-likelihood (nats), bits/dim and a complexity-corrected OOD score, as Parquet per "
        "shard under <output>/model=<name>/version=<v>/. Shards already scored (at their "
        f"current version) are skipped. The model: --model, else ${MODEL_VARIABLE}, else the "
        "--config file's."
    )
    return config_parser(PROG, description, ScoreConfig)


def model_option(args: argparse.Namespace) -> str | None:
    """--model, else $FLOWRAY_SCORE_MODEL unless --set gives the model (module docstring)."""
    given = config_flags(args).get("model")
    if given or any(item.split("=", 1)[0].strip() == "model" for item in args.overrides):
        return given
    return os.environ.get(MODEL_VARIABLE) or None


def drift_exit(level: str, fail_on: str) -> bool:
    """Whether a verdict `level` reaches `fail_on` ("off", "suspected" or "detected")."""
    from pipeline.model.calibration import LEVELS

    return fail_on != "off" and level in LEVELS and LEVELS.index(level) >= LEVELS.index(fail_on)


def print_result(result: ScoreResult, fail_on_drift: str = "off") -> int:
    """The job's closing lines, and its exit code (module docstring)."""
    print(result.line())
    print(result.drift or "drift: unknown (no images scored in this run)")
    for line in result.left_out_lines():
        print(f"  {line}")
    if result.summary_url:
        print(f"summary: {result.summary_url}  mlflow run: {result.mlflow_run_id}")
    if result.status == "partial":
        print(
            f"{len(result.shards_left_out)} shard(s) left out; a rerun with the same options "
            "tries them again",
            file=sys.stderr,
        )
    elif result.status == "failed":
        print(f"no shard of {result.shards_total} could be scored", file=sys.stderr)
    if result.status == "complete" and drift_exit(result.drift_level, fail_on_drift):
        print(f"{result.drift_level} drift: exit {EXIT_DRIFT}", file=sys.stderr)
        return EXIT_DRIFT
    return EXIT_CODES[result.status]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from pipeline.batch.scoring.config import ScoreConfig
        from pipeline.batch.scoring.job import score

        config = config_from_args(ScoreConfig, args, {"model": model_option(args)})
        check_tracking_server(config.tracking_uri)
        check_local_gpus("--gpus-per-actor", config.gpus_per_actor, args.address)
        connect_ray(args.address, args.verbose)
        return print_result(score(config), config.fail_on_drift)

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
