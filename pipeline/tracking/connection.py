"""MLflow connection: tracking URI defaults, experiments with explicit artifact roots, readable
errors when the server is down.

The embedded default is `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts`
(MLflow 3 refuses a ./mlruns file store); the work folder is the same for every command.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flowmodel.errors import FlowrayError
from flowmodel.typed import flatten, to_dict
from pipeline.storage import redact_url

DEFAULT_WORKDIR = "flowray-work"
WORKDIR_VARIABLE = "FLOWRAY_WORKDIR"


class TrackingError(FlowrayError, RuntimeError):
    """The tracking server cannot be reached or refused; `hint` says what to try."""

    exit_code = 1  # a runtime failure (jobs.errors.EXIT_FAILURE), not a usage error


def default_workdir() -> str:
    """$FLOWRAY_WORKDIR, else `flowray-work` in the current folder."""
    return os.environ.get(WORKDIR_VARIABLE) or DEFAULT_WORKDIR


def default_tracking_uri(workdir: str | Path | None = None) -> str:
    """`sqlite:///<absolute workdir>/mlflow.db`, the folder created."""
    folder = Path(workdir or default_workdir()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, workdir: str | Path | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the embedded SQLite store under `workdir`.
    A relative sqlite path is made absolute, so Ray workers with another cwd find the same file."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO lines and artifact progress bars off for the block (lines a job's user can
    do nothing with); warnings still show."""
    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Set the tracking URI and return the experiment id of `name`, creating it if needed (for a
    SQLite store with the artifact root `<db folder>/mlartifacts`, never ./mlruns)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    try:
        with quiet_mlflow():  # a new SQLite store logs its table creation
            client = MlflowClient(tracking_uri)
            experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            root = Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts"
            artifact_location = root.resolve().as_uri()
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as err:
        raise TrackingError(
            f"MLflow tracking at {redact_url(tracking_uri)} failed: {err.message.splitlines()[0]}",
            hint="check MLFLOW_TRACKING_URI / --tracking-uri; `make mlflow-up` starts a local server",
        ) from err
    except Exception as err:  # connection errors surface as requests/urllib3 exceptions
        raise TrackingError(
            f"MLflow tracking server at {redact_url(tracking_uri)} is not reachable ({type(err).__name__})",
            hint="start it (`make mlflow-up`) or unset MLFLOW_TRACKING_URI to use the embedded SQLite store",
        ) from err


# MLflow's limit on one param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_LENGTH = 6000


def log_config_params(run_id: str, config: Any, *, exclude: Collection[str] = ()) -> None:
    """Log a typed config as the run's params, one per dotted key (`optim.lr`): strings as they
    are, less any `user:password@`, everything else as JSON, cut to MLflow's length limit.
    `exclude` drops top-level sections."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    values = {k: v for k, v in to_dict(config).items() if k not in exclude}
    params = [
        Param(
            key,
            redact_url(value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_LENGTH],
        )
        for key, value in flatten(values).items()
    ]
    MlflowClient().log_batch(run_id, params=params)
