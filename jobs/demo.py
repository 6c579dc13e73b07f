"""`flowray demo` (`make demo`): the whole pipeline on the embedded default, on one machine.

Fashion-MNIST -> shards on local disk -> Ray Train (2 workers, time-bounded) -> MLflow in SQLite,
model registered -> the test split scored -> samples drawn -> a short summary.

Everything lives under --workdir, the work folder every other command uses by default, so
`flowray models list`, score, sample and serve find its model afterwards. A rerun reuses the
shards and resumes the training run: --minutes is the run's whole training budget.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.config import add_set_argument, add_verbose_argument, job_parser, setup_logging
from jobs.errors import run_main
from jobs.prepare import print_progress, summary_lines
from pipeline.config import load_config
from pipeline.tracking.connection import default_tracking_uri, default_workdir

if TYPE_CHECKING:  # the pipeline is imported when a step runs, so --help stays fast
    from pipeline.batch.sampling import SampleResult
    from pipeline.batch.scoring.config import ScoreResult
    from pipeline.train.driver import TrainResult

PRESET = "fashion-mnist"


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("flowray demo", __doc__.split("\n\n")[1])
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for data, runs, MLflow store, scores, samples (default: $FLOWRAY_WORKDIR, "
        "else flowray-work)",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="image source for prepare (default: idx:$FASHION_MNIST_DIR or the Debian package's folder)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="the training run's whole wall-clock budget, in minutes (a rerun resumes within it)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N images of each split (default: all)",
    )
    parser.add_argument(
        "-n", "--num", type=int, default=256, help="images to generate, as `flowray sample -n`"
    )
    add_set_argument(
        parser,
        f"override a training config value of the {PRESET} preset, e.g. --set optim.lr=5e-4",
    )
    add_verbose_argument(parser)
    return parser


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    return run_main("flowray demo", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """The four steps, each printed as it starts, then what they left behind."""
    workdir = Path(args.workdir or default_workdir()).resolve()
    tracking_uri = default_tracking_uri(workdir)
    source = args.source or f"idx:{os.environ.get('FASHION_MNIST_DIR', '')}"
    started = _step(f"1/4 prepare shards from {source} -> {workdir / 'data'}")
    _prepare(source, workdir / "data", args.limit)
    trained = _train(args, workdir, tracking_uri)
    model_uri = f"models:/{trained.model_name}/{trained.model_version}"
    _step(f"3/4 score the test split with {model_uri}")
    scored = _score(model_uri, workdir, tracking_uri)
    _step(f"4/4 sample {args.num} images from {model_uri}")
    sampled = _sample(model_uri, trained.model_version, args.num, workdir, tracking_uri)
    minutes = (time.monotonic() - started) / 60
    print(f"""
== flowray demo done in {minutes:.1f} minutes
  test bits/dim      {scored.mean_bits_per_dim:.4f} (all {scored.images_scored + scored.images_skipped:,} test images scored; validation during training {trained.val_bits_per_dim:.4f})
  training           {trained.steps} steps, {trained.images_per_second:.0f} images/s (median, {args.workers} workers)
  model              {trained.model_name}: registered v{trained.model_version}, {trained.promotion_reason}  ({model_uri})
  scores (Parquet)   {scored.output}
  pictures           {scored.summary_url or scored.output}  (bits/dim histogram, least likely images)
                     {sampled.output}  (sample grids)
                     {workdir / "pictures"}  (training curves)
  MLflow UI          {Path(sys.executable).parent / "mlflow"} ui --backend-store-uri {tracking_uri} --port 5000
""")
    return 0


def _prepare(source: str, data: Path, limit: int | None) -> None:
    from pipeline.data.shards import prepare
    from pipeline.data.sources import open_source

    prepared = prepare(
        open_source(source), str(data), shard_samples=10_000, limit=limit, progress=print_progress
    )
    for line in summary_lines(prepared):
        print(f"  {line}")


def _train(args: argparse.Namespace, workdir: Path, tracking_uri: str) -> TrainResult:
    """Local Ray sized for the Train workers plus Ray Data's readers, then the preset's run."""
    import ray

    from pipeline.local_ray import quiet_local_ray
    from pipeline.train.config import TrainConfig
    from pipeline.train.driver import train

    data = workdir / "data"
    config = load_config(
        TrainConfig,
        PRESET,
        [
            f"data.train={data / 'train'}",
            f"data.validation={data / 'test'}",
            f"run.storage_path={workdir / 'runs'}",
            f"workdir={workdir}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"max_minutes={args.minutes}",
            f"scaling.num_workers={args.workers}",
            *args.overrides,
            *(["verbose=true"] if args.verbose else []),
        ],
    )
    # Ray's lines a user cannot act on stay off unless --set verbose=true (as `flowray train`).
    quiet_local_ray(config.verbose)
    ray.init(
        address="local",
        num_cpus=int(args.workers * config.scaling.cpus_per_worker) + 2,
        log_to_driver=True,
        logging_level=logging.INFO if config.verbose else logging.WARNING,
    )
    _step(
        f"2/4 train {config.run.name} with {args.workers} Ray Train workers for up to {args.minutes:g} minutes"
    )
    return train(config)


def _score(model_uri: str, workdir: Path, tracking_uri: str) -> ScoreResult:
    from pipeline.batch.scoring.job import ScoreConfig, score

    scored = score(
        ScoreConfig(
            model=model_uri,
            input=str(workdir / "data" / "test"),
            output=str(workdir / "scores"),
            tracking_uri=tracking_uri,
        )
    )
    print(f"  {scored.line()}")
    if scored.drift:  # against the calibration made at registration (the same split here)
        print(f"  {scored.drift}")
    return scored


def _sample(model_uri: str, version: str, n: int, workdir: Path, tracking_uri: str) -> SampleResult:
    from pipeline.batch.sampling import SampleConfig, generate

    sampled = generate(
        SampleConfig(
            model=model_uri,
            output=str(workdir / "samples" / f"version={version}"),
            n=n,
            tracking_uri=tracking_uri,
        )
    )
    print(f"  {sampled.line()}")
    return sampled


if __name__ == "__main__":
    sys.exit(main())
