"""A local Ray started in this process, without the console lines a user cannot act on."""

from __future__ import annotations

import logging
import os


def quiet_local_ray(verbose: bool) -> None:
    """Before a local `ray.init()` (its processes inherit this environment), unless `verbose`:
    Ray's token-auth warning off (it asks the user to disable the auth a local cluster gets), and
    Ray Data's per-dataset lines kept in ray-data.log, off the console (RAY_DATA_LOGGING_CONFIG,
    unless the user set it)."""
    if verbose:
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = _ray_data_logging_file()


def _ray_data_logging_file() -> str:
    """Ray Data's default logging config with the console at ERROR, as a file (JSON is YAML)."""
    import json
    import tempfile

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
        },
        "filters": {"console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"}},
        "handlers": {
            "file": {
                "class": "ray.data._internal.logging.SessionFileHandler",
                "formatter": "ray",
                "filename": "ray-data.log",
            },
            "console": {
                "class": "ray._private.log.PlainRayHandler",
                "formatter": "ray",
                "level": "ERROR",
                "filters": ["console_filter"],
            },
        },
        "loggers": {
            "ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}
        },
    }
    path = os.path.join(tempfile.gettempdir(), "flowray-ray-data-logging.yaml")
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as file:
        json.dump(config, file, indent=1)
    os.replace(temp, path)  # whole for a concurrent reader
    return path
