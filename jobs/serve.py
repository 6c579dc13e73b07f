"""`flowray serve`: online scoring of images over HTTP on Ray Serve.

    flowray serve --model models:/fashion-flow@champion            # http://127.0.0.1:8000
    curl -s -H 'Content-Type: image/png' --data-binary @shirt.png http://127.0.0.1:8000/score
    flowray serve --model models:/fashion-flow@champion --address auto --detach   # on a cluster

Serves until Ctrl-C (or SIGTERM), then removes the application; with --detach it leaves the
application running on the cluster and returns. The model reloads when its alias moves
(--reload-interval). Routes and request formats: pipeline/serve/deployment.py, requests.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import replace

from jobs._batch import add_common_arguments, check_tracking_server, default_of
from jobs.config import HelpFormatter, add_config_arguments, load_config
from jobs.errors import UserError, run_main

PROG = "flowray serve"

# option -> ServeConfig field, for the options that map one to one.
FIELDS = {
    "model": "model",
    "host": "host",
    "port": "port",
    "route_prefix": "route_prefix",
    "app_name": "app_name",
    "seed": "seed",
    "draws": "draws",
    "max_batch_size": "max_batch_size",
    "batch_wait_ms": "batch_wait_ms",
    "reload_interval": "reload_interval_s",
    "replicas": "replicas",
    "cpus_per_replica": "cpus_per_replica",
    "tracking_uri": "tracking_uri",
}


def parser() -> argparse.ArgumentParser:
    from pipeline.serve.config import ServeConfig

    def d(name: str) -> object:
        return default_of(ServeConfig, name)

    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description="Serve a registered flow on Ray Serve: POST a PNG/JPEG image, or JSON "
        "integer pixels, to <url>/score for its log-likelihood, bits/dim and OOD score (the "
        "score job's figures); GET <url>/health names the version answering. Requests are "
        "batched; a models:/<name>@<alias> model reloads when the alias moves.",
    )
    p.add_argument(
        "--model",
        help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run>/<path> or a local "
        "model directory (required unless in --config)",
    )
    p.add_argument("--host", help=f"HTTP host of Ray Serve's proxy (default: {d('host')})")
    p.add_argument("--port", type=int, help=f"HTTP port (default: {d('port')})")
    p.add_argument(
        "--route-prefix", help=f"path prefix of the routes (default: {d('route_prefix')})"
    )
    p.add_argument("--app-name", help=f"Ray Serve application name (default: {d('app_name')})")
    p.add_argument(
        "--seed", type=int, help=f"dequantization seed, as score's (default: {d('seed')})"
    )
    p.add_argument("--draws", type=int, help=f"dequantization draws (default: {d('draws')})")
    p.add_argument(
        "--max-batch-size",
        type=int,
        help=f"most images per forward pass (default: {d('max_batch_size')})",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        help=f"longest wait for a batch to fill, ms (default: {d('batch_wait_ms')})",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        help=f"seconds between registry checks of the alias; 0 = never (default: "
        f"{d('reload_interval_s')})",
    )
    p.add_argument("--replicas", type=int, help=f"Serve replicas (default: {d('replicas')})")
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        help=f"CPUs of each replica (default: {d('cpus_per_replica')})",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="deploy to the cluster (--address) and return, leaving the application running",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, else a "
        "local Ray started in this process)",
    )
    add_config_arguments(p, None)
    add_common_arguments(p, ray=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_main(PROG, lambda: serve(args))


def serve(args: argparse.Namespace) -> int:
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.runner import check_model, check_port_free, start, stop
    from pipeline.tracking.connection import resolve_tracking_uri

    flags = {field: getattr(args, option) for option, field in FIELDS.items()}
    config = load_config(ServeConfig, args.config, args.overrides, flags)
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    check_tracking_server(tracking_uri)
    config = replace(config, tracking_uri=tracking_uri)  # replicas get the resolved URI
    on_cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if args.detach and not on_cluster:
        raise UserError(
            "--detach: expected a Ray cluster (--address or $RAY_ADDRESS), found none; a local "
            "Ray stops with this process",
            hint="drop --detach to serve until Ctrl-C, or pass --address",
        )
    if not on_cluster:
        check_port_free(config.host, config.port)
    check_model(config)  # before Ray starts: a wrong reference fails in seconds
    stopped = _stop_on_signals()  # before starting: a Ctrl-C during start-up still stops cleanly
    _connect(args.address)
    info = start(config, model_checked=True)
    print(
        f"serving {info.reference} ({info.name} v{info.version}, images {'x'.join(map(str, info.image_shape))})\n"
        f"  score:  curl -s -H 'Content-Type: image/png' --data-binary @image.png {info.url}/score\n"
        f"  health: curl -s {info.url}/health",
        flush=True,
    )
    if args.detach:
        print(f"detached: the application {config.app_name!r} keeps running on the cluster")
        return 0
    while not stopped.wait(1.0):  # a bounded wait keeps the main thread responsive to signals
        pass
    print("stopping", flush=True)
    stop(config, shutdown=not on_cluster)
    return 0


def _connect(address: str | None) -> None:
    """A cluster (`address`, $RAY_ADDRESS), else a local Ray with this machine's CPUs."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT or SIGTERM sets (instead of raising KeyboardInterrupt mid-call)."""
    stopped = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stopped.set())
    return stopped


if __name__ == "__main__":
    sys.exit(main())
