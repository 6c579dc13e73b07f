"""What the batch entry points share: the Ray connection, a GPU check for a local Ray and a quick
tracking-server check."""

from __future__ import annotations

import base64
import logging
import os
import urllib.error
import urllib.parse
import urllib.request

from jobs.errors import EXIT_FAILURE, UserError
from pipeline.storage import redact_url


def connect_ray(address: str | None, verbose: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a quiet local Ray."""
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
    """Asking a local Ray for more GPUs than this machine has fails here, instead of leaving tasks
    waiting for ever; a cluster is not checked (its autoscaler may add GPU nodes)."""
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


def check_tracking_server(
    configured: str | None, workdir: str | None = None, timeout: float = 3.0
) -> str:
    """The tracking URI `configured` resolves to (`resolve_tracking_uri`), after failing in
    seconds, not after minutes of MLflow retries, when it is a tracking server that is down; a
    `user:password@` in the URI is sent as HTTP basic auth, as MLflow does."""
    from pipeline.tracking.connection import resolve_tracking_uri

    uri = resolve_tracking_uri(configured, workdir)
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urllib.parse.urlsplit(uri)
    headers = {}
    userinfo, at, host = parts.netloc.rpartition("@")
    if at:
        user, _, password = userinfo.partition(":")
        credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        token = base64.b64encode(credentials.encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        parts = parts._replace(netloc=host)
    health = urllib.parse.urlunsplit(parts).rstrip("/") + "/health"
    try:
        request = urllib.request.Request(health, headers=headers)
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return uri  # it answered: up, even if /health is not served there
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a malformed URL
        reason = redact_url(str(getattr(err, "reason", err)))
        raise UserError(
            f"MLflow tracking server at {redact_url(uri)} is not reachable ({reason})",
            hint="start it (`make mlflow-up`), pass --tracking-uri, or unset MLFLOW_TRACKING_URI "
            "to use the embedded SQLite store",
            exit_code=EXIT_FAILURE,  # a service down: a runtime failure, not a usage error
        ) from err
    return uri
