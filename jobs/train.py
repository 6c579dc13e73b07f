"""`flowray train`: train a flow with Ray Train, log it to MLflow, register it.

flowray train --config fashion-mnist --set max_steps=2000 --set scaling.num_workers=2
python -m jobs.train --config jobs/configs/rgb32.yaml      # the same, also under `ray job submit`
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.config import config_from_args, config_parser, setup_logging
from jobs.errors import run_main

DEFAULT_CONFIG = "fashion-mnist"
# Flags for the keys every job names the same way; every other key is `--set section.key=value`.
FLAGS = {
    "run.address": ("--address",),
    "mlflow.tracking_uri": ("--tracking-uri",),
    "verbose": ("-v", "--verbose"),
}


def build_parser() -> argparse.ArgumentParser:
    from pipeline.train.config import TrainConfig

    def print_config(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--print-config", action="store_true", help="print the resolved config as YAML and exit"
        )

    return config_parser(
        "flowray train",
        "Train a multiscale flow with Ray Train (DDP) on prepared shards or on WebDataset "
        "shards in place (data.train / data.validation: a prepared split, a brace pattern, a "
        "prefix of .tar files or a list file; local or s3://); log metrics, samples and the "
        "model to MLflow and register it (alias candidate; champion when better). Rerunning "
        "with the same run.name and run.storage_path resumes from the latest checkpoint, at the "
        "epoch and batch where it stopped. Config keys: the sections of TrainConfig "
        "(pipeline/train/config.py); `--print-config` shows them all, resolved.",
        TrainConfig,
        flags=FLAGS,
        extra=print_config,
        default_config=DEFAULT_CONFIG,
        flat=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("flowray train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from jobs._batch import check_tracking_server
    from pipeline.train.config import TrainConfig
    from pipeline.train.driver import train

    config = config_from_args(TrainConfig, args)
    if args.print_config:
        import yaml

        from pipeline.storage import redact_url

        print(redact_url(yaml.safe_dump(config.to_dict(), sort_keys=False)))
        return 0
    setup_logging(config.verbose, logging.WARNING)
    check_tracking_server(config.mlflow.tracking_uri, config.workdir)
    result = train(config)
    print(
        f"\ndone: {result.steps} steps, validation {result.val_bits_per_dim:.4f} bits/dim, "
        f"{result.images_per_second:.0f} img/s (median)\n"
        f"model: registered {result.model_name} v{result.model_version} (alias candidate), "
        f"{result.promotion_reason}\n"
        f"checkpoint: {result.checkpoint_path}\nMLflow run: {result.mlflow_run_id}"
        + (f"\nskipped images: {result.skipped_images}" if result.skipped_images else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
