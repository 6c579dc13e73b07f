"""What the batch entry points (score, sample, models) share: their common options, option
defaults read from the config dataclass, the Ray connection and a quick tracking-server check."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import urllib.error
import urllib.request
from typing import Any

from jobs.errors import EXIT_FAILURE, UserError
from pipeline.storage import redact_url

__all__ = [
    "add_common_arguments",
    "check_local_gpus",
    "check_tracking_server",
    "connect_ray",
    "default_of",
]


def default_of(cls: type, name: str) -> Any:
    """The dataclass default of field `name`, for help texts (defaults live in the config only)."""
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            return "required"
    raise KeyError(name)


def add_common_arguments(parser: argparse.ArgumentParser, *, ray: bool = True) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<cwd>/flowray-work/mlflow.db)",
    )
    if ray:
        parser.add_argument(
            "--address",
            default=None,
            help="Ray cluster address, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, "
            "else a local Ray started in this process with one logical CPU per core plus one)",
        )
        parser.add_argument(
            "--endpoint-url",
            default=None,
            help="S3-compatible endpoint for s3:// URLs (default: $AWS_ENDPOINT_URL, else AWS)",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")


def connect_ray(address: str | None, verbose: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a local Ray here
    (with Ray's lines a user cannot act on off unless `verbose`, as `flowray train` does)."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
        return
    from pipeline.local_ray import quiet_local_ray

    quiet_local_ray(verbose)
    from pipeline.batch.scoring.actors import local_cpus

    ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, **quiet)


def check_local_gpus(option: str, requested: float, address: str | None) -> None:
    """A local Ray gets this machine's GPUs: asking for more fails here, naming the fix, instead
    of leaving the job's actors or tasks waiting for ever on a GPU that is not there. A cluster
    joined by address is not checked: its autoscaler may add GPU nodes on demand."""
    if requested <= 0 or address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    found = torch.cuda.device_count()
    if found < requested:
        raise UserError(
            f"{option} {requested:g}: expected a CUDA GPU for a local Ray, found {found} on this "
            "machine",
            hint=f"leave out {option} to run on CPUs, or pass --address of a Ray cluster with "
            "GPU nodes",
        )


def check_tracking_server(uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after minutes of MLflow retries, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered: up, even if /health is not served there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server at {redact_url(uri)} is not reachable ({reason})",
            hint="start it (`make mlflow-up`), pass --tracking-uri, or unset MLFLOW_TRACKING_URI "
            "to use the embedded SQLite store",
            exit_code=EXIT_FAILURE,  # a service down: a runtime failure, not a usage error
        ) from err
