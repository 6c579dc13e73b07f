"""`flowray scores`: questions about scoring outputs, answered from the Parquet files alone.

    flowray scores top --output s3://scores/photos --model photo-flow -n 100
    flowray scores top --output scores --model fashion-flow/3 --by ood_score --grid ood.png
    flowray scores drift --output s3://scores/photos --model photo-flow/3 --run latest

`top` prints the least likely (highest bits/dim) or most out-of-distribution (highest ood_score)
images of one model version, with their keys and shard URLs, reading the files with pyarrow in
bounded memory (pipeline.batch.top); `--grid` draws them, fetched from their shards. `drift` recomputes the drift
verdict (pipeline.model.calibration) of a version's scores, or of one scoring run's files, against
the version's calibration in the MLflow registry; exit 5 (EXIT_DRIFT) at or above --fail-on. No
Ray: storage, and MLflow for the calibration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.config import add_subcommands, add_verbose_argument, job_parser, setup_logging
from jobs.errors import EXIT_DRIFT, EXIT_USAGE, run_main

PROG = "flowray scores"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, "Query scoring outputs (the Parquet files `flowray score` writes).")
    commands = add_subcommands(p, "top", "drift")
    top = commands.add_parser(
        "top",
        help="the least likely (or most OOD) images of a model version, with their shard URLs",
    )
    top.add_argument(
        "--output", required=True, help="the --output given to `flowray score` (required)"
    )
    top.add_argument(
        "--model",
        required=True,
        help="<name>[/<version>]; without a version, the newest version scored under --output "
        "(required)",
    )
    top.add_argument("-n", "--num", type=_positive, default=100, help="how many images")
    top.add_argument(
        "--by",
        choices=("bits_per_dim", "ood_score"),
        default="bits_per_dim",
        help="rank by bits/dim (least likely) or by OOD score (most out-of-distribution)",
    )
    top.add_argument(
        "--grid", default=None, help="also draw the images into this PNG file (default: none)"
    )
    top.add_argument(
        "--tile", type=_positive, default=64, help="height and width of each image in the grid"
    )
    top.add_argument(
        "--input",
        default=None,
        help="the scored input, for outputs that name shards without their URL (default: the "
        "input the newest summary recorded)",
    )
    _add_storage(top)
    drift = commands.add_parser(
        "drift",
        help="the drift verdict of a version's scores (or of one run's) against its calibration",
    )
    drift.add_argument("--output", required=True, help="the --output given to `flowray score`")
    drift.add_argument(
        "--model",
        required=True,
        help="<name>[/<version>] of a registered model; without a version, the newest version "
        "scored under --output (required)",
    )
    drift.add_argument(
        "--run",
        default=None,
        help="only the files one scoring run wrote: its _summary/<UTC time> folder name, or "
        "latest (the newest run that scored images; default: every file of the version)",
    )
    drift.add_argument(
        "--flag-quantile",
        type=float,
        default=None,
        help="flag threshold: this quantile of the validation ood_score (default: the "
        "calibration's, 0.95)",
    )
    drift.add_argument(
        "--fail-on",
        choices=("off", "suspected", "detected"),
        default="off",
        help="exit 5 when the verdict is at least this level",
    )
    drift.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<workdir>/mlflow.db)",
    )
    _add_storage(drift)
    return p


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint for s3:// URLs (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    parser.add_argument(
        "--region",
        default=None,
        help="S3 region (default: $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1)",
    )
    add_verbose_argument(parser)


def _top(args: argparse.Namespace) -> int:
    from pipeline.batch.top import draw_top, top_scores
    from pipeline.storage import StorageConfig

    storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    result = top_scores(
        args.output, args.model, storage, n=args.num, by=args.by, input_url=args.input
    )
    what = "least likely" if args.by == "bits_per_dim" else "most out-of-distribution"
    print(
        f"model={result.model_name} version={result.version}: {len(result.rows)} {what} of "
        f"{result.rows_read:,} images (by {args.by}) in {result.files_read} files, "
        f"read in {result.seconds:.2f} s"
        + (
            f"; {result.non_finite_scores} non-finite scores (inf or NaN), ranked first"
            if result.non_finite_scores
            else ""
        )
    )
    print(result.table())
    if args.grid:
        png = draw_top(result, storage, shape=(3, args.tile, args.tile))
        Path(args.grid).write_bytes(png)
        print(f"grid: {args.grid}")
    return 0


def _drift(args: argparse.Namespace) -> int:
    import mlflow

    from jobs._batch import check_tracking_server
    from jobs.score import drift_exit
    from pipeline.batch.scoring.config import ScoreError
    from pipeline.batch.scoring.report import drift_unknown
    from pipeline.batch.top import model_prefix, output_drift, run_files
    from pipeline.storage import StorageConfig
    from pipeline.tracking.registry import load_calibration

    storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    prefix, name, version = model_prefix(args.output, args.model, storage)
    if not version.isdigit():
        raise ScoreError(
            f"--model: expected a registered model version (its calibration is in the "
            f"registry), found version {version!r} under {args.output}"
        )
    uri = check_tracking_server(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    calibration = load_calibration(name, version)
    problem = calibration.problem() if calibration is not None else ""
    if calibration is None or problem:
        print(drift_unknown(name, version, True, problem))
        return 0
    files, what = None, "every file"
    if args.run:
        run, files = run_files(prefix, storage, args.run)
        what = f"the {len(files)} file(s) of run {run}"
    drift = output_drift(prefix, storage, calibration, files, args.flag_quantile)
    print(f"model={name} version={version}: {what} under {prefix}")
    print(drift.line())
    return EXIT_DRIFT if drift_exit(drift.level, args.fail_on) else 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help(sys.stderr)
        return EXIT_USAGE
    setup_logging(args.verbose, logging.WARNING)
    return run_main(PROG, lambda: _top(args) if args.command == "top" else _drift(args))


if __name__ == "__main__":
    sys.exit(main())
