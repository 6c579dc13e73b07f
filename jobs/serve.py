"""`flowray serve`: online scoring of images over HTTP on Ray Serve.

    flowray serve --model models:/fashion-flow@champion            # http://127.0.0.1:8000
    curl -s -H 'Content-Type: image/png' --data-binary @shirt.png http://127.0.0.1:8000/score
    flowray serve --model models:/fashion-flow@champion --address auto --detach   # on a cluster

Serves until Ctrl-C (or SIGTERM), then removes the application; with --detach it leaves the
application running on the cluster and returns. The model reloads when its alias moves
(--reload-interval-s). Routes and request formats: pipeline/serve/deployment.py, requests.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace

from jobs._batch import check_tracking_server, connect_ray
from jobs.config import config_from_args, config_parser, setup_logging
from jobs.errors import UserError, run_main

PROG = "flowray serve"


def parser() -> argparse.ArgumentParser:
    from pipeline.serve.config import ServeConfig

    def detach(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--detach",
            action="store_true",
            help="deploy to the cluster (--address) and return, leaving the application running",
        )

    return config_parser(
        PROG,
        "Serve a registered flow on Ray Serve: POST a PNG/JPEG image, or JSON integer pixels, to "
        "<url>/score for its log-likelihood, bits/dim and OOD score (the score job's figures); "
        "GET <url>/health names the version answering. Requests are batched; a "
        "models:/<name>@<alias> model reloads when the alias moves.",
        ServeConfig,
        extra=detach,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(PROG, lambda: serve(args))


def serve(args: argparse.Namespace) -> int:
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.runner import check_model, check_port_free, start, stop

    config = config_from_args(ServeConfig, args)
    tracking_uri = check_tracking_server(config.tracking_uri)
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
    connect_ray(args.address, args.verbose)
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


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT or SIGTERM sets (instead of raising KeyboardInterrupt mid-call)."""
    stopped = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stopped.set())
    return stopped


if __name__ == "__main__":
    sys.exit(main())
