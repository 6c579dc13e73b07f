"""A local Ray started in this process, without the console lines a user cannot act on.

`flowray train`, score, sample and the demo start a local Ray when no cluster address is given;
each calls `quiet_local_ray` first (its processes inherit this environment). Clusters joined by
address keep their own settings.
"""

from __future__ import annotations

import logging
import os

__all__ = ["quiet_local_ray"]


def quiet_local_ray(verbose: bool) -> None:
    """Before a local `ray.init()` (its processes inherit this environment), unless `verbose`:

    - Ray's token-auth setup logger at ERROR: a local cluster gets token authentication by
      default (kept), and its warning "Token authentication is enabled ... set
      RAY_AUTH_MODE=disabled to opt out" asks the user to weaken it. (Setting RAY_AUTH_MODE=token
      here instead does not work: Ray caches its config at import.)
    - RAY_DATA_LOGGING_CONFIG: Ray Data's documented logging config, with its console handler at
      ERROR and its file handler (ray-data.log in the session's logs) at DEBUG, as in Ray's default: the
      per-epoch "Starting execution of Dataset ..." / "Execution plan ..." lines, "Progress
      bars disabled" and the logging-progress notice stay in the file, off the console.

    A variable the user set is left as it is. Clusters joined by address keep their own settings.
    """
    if verbose:
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = _ray_data_logging_file()


def _ray_data_logging_file() -> str:
    """Ray Data's default logging config (ray.data._internal.logging) with the console at ERROR,
    as a file (JSON is YAML) in the temp folder; the same content each time."""
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
    text = json.dumps(config, indent=1)
    try:
        with open(path) as existing:
            if existing.read() == text:
                return path
    except OSError:
        pass
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as file:
        file.write(text)
    os.replace(temp, path)  # whole for a concurrent reader
    return path
