"""`flowray train`: train a flow with Ray Train, log it to MLflow, register it.

flowray train --config fashion-mnist --set max_steps=2000 --set scaling.num_workers=2
python -m jobs.train --config jobs/configs/rgb32.yaml      # the same, also under `ray job submit`
"""

from __future__ import annotations

import argparse
import sys

from jobs.config import HelpFormatter, add_config_arguments, load_config
from jobs.errors import user_errors

DEFAULT_CONFIG = "fashion-mnist"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowray train",
        description="Train a multiscale flow with Ray Train (DDP) on prepared shards or on "
        "WebDataset shards in place (data.train / data.validation: a prepared split, a brace "
        "pattern, a prefix of .tar files or a list file; local or s3://); log metrics, samples "
        "and the model to MLflow and register it (alias candidate; champion when better). "
        "Rerunning with the same run.name and run.storage_path resumes from the latest checkpoint, "
        "at the epoch and batch where it stopped.",
        formatter_class=HelpFormatter,
    )
    add_config_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, else a "
        "local Ray started in this process)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=None,
        help="also show Ray's own lines: Ray Train's per-report and worker-group lines, Ray "
        "Data's per-epoch execution plans, the token-auth notice (verbose: true in the config)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors("flowray train"):
        from jobs._batch import check_tracking_server
        from pipeline.tracking.connection import resolve_tracking_uri
        from pipeline.train.config import TrainConfig
        from pipeline.train.driver import train

        flags = {
            "run.address": args.address,
            "mlflow.tracking_uri": args.tracking_uri,
            "verbose": args.verbose,
        }
        config = load_config(TrainConfig, args.config, args.overrides, flags)
        if args.print_config:
            import yaml

            from pipeline.storage import redact_url

            print(redact_url(yaml.safe_dump(config.to_dict(), sort_keys=False)))
            return 0
        check_tracking_server(resolve_tracking_uri(config.mlflow.tracking_uri, config.workdir))
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
