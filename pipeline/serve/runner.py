"""Start and stop the served model on Ray Serve, once Ray is connected (a local Ray or a cluster).

The model is resolved on the driver before anything is deployed, so a reference that names
nothing fails in seconds with the registry's aliases listed, not after Serve's retries.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from flowmodel.errors import FlowrayError
from pipeline.serve.config import ServeConfig


class PortInUse(FlowrayError, ValueError):
    hint = "pass another --port, or stop what listens there"


@dataclass(frozen=True)
class ServingInfo:
    url: str  # base URL of the routes: <url>/score, <url>/health
    reference: str
    name: str
    version: str
    image_shape: tuple[int, ...]


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse when `host:port` cannot be bound here (a local Serve proxy would fail)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PortInUse(
                f"{host}:{port}: expected a free port, found it in use ({err.strerror})"
            ) from err


def check_model(config: ServeConfig) -> None:
    """Resolve `config.model` here, with no Ray (ModelNotFound lists the registry's aliases)."""
    import mlflow

    from pipeline.batch.resolve import resolve_batch_model

    mlflow.set_tracking_uri(config.tracking_uri)
    resolve_batch_model(config.model)


def start(config: ServeConfig, model_checked: bool = False) -> ServingInfo:
    """Deploy `config`'s model as the Serve application `config.app_name`; returns once a
    replica answers. `config.tracking_uri` must be resolved (replicas read it as given)."""
    from ray import serve

    from pipeline.serve.deployment import build_app

    if not model_checked:
        check_model(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    handle = serve.run(
        build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False
    )
    health = handle.health.remote().result()
    shape = tuple(health["image_shape"])
    return ServingInfo(config.url, health["reference"], health["model"], health["version"], shape)


def stop(config: ServeConfig, shutdown: bool) -> None:
    """Delete the application; with `shutdown`, Serve itself too (a Serve this process started)."""
    from ray import serve

    serve.delete(config.app_name)
    if shutdown:
        serve.shutdown()
